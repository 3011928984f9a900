"""Running scripts with shims: `python -m shims run script.py ARGS`, and the processes a patched run starts.

Children inherit SHIMS_* variables and `shims/startup/bootstrap` on PYTHONPATH (config.export_for_children), so their
`sitecustomize` calls `boot_child()`: enable from the environment, then reach the script's functions in whichever way
the child runs it (a torchrun worker runs it as a file; a multiprocessing spawn child runs it through
`runpy.run_path(path, run_name="__mp_main__")`).
"""

from __future__ import annotations

import os
import sys


def run_script(path, args):
    """Run `path` as __main__ with sys.argv = [path, *args], as `python path args` would, with patches enabled."""
    import runpy
    from shims.startup import _boot
    if not os.path.isfile(path):
        raise SystemExit(f"shims run: no such script: {path!r}")
    engine = _boot.start()
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    from shims.startup import mainwatch
    mainwatch.run_path(engine, path, run_name="__main__", fallback=runpy.run_path)


def _script_from_argv():
    """The script file of this interpreter's command line, or None (-c, -m, interactive)."""
    if not hasattr(sys, "orig_argv"):  # Python 3.9: at sitecustomize time sys.argv[0] is the script, or -c, -m, -, ''
        first = sys.argv[0] if getattr(sys, "argv", None) else ""
        return first if first not in ("-c", "-m", "-", "") and os.path.isfile(first) else None
    argv = list(sys.orig_argv)[1:]
    takes_value = {"-W", "-X", "--check-hash-based-pycs"}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-c", "-m", "-"):
            return None
        if word in takes_value:
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        return word if os.path.isfile(word) else None
    return None


def _wrap_run_path(engine):
    """In a child: a spawn child executes the parent's script via runpy.run_path(..., run_name="__mp_main__")."""
    import runpy
    original = runpy.run_path
    if getattr(original, "__shims_original__", None) is not None:
        return

    def run_path(path_name, init_globals=None, run_name=None):
        if run_name in ("__mp_main__", "__main__") and engine.active:
            from shims.startup import mainwatch
            return mainwatch.run_path(engine, path_name, init_globals, run_name, fallback=original)
        return original(path_name, init_globals, run_name)

    run_path.__shims_original__ = original
    run_path.__wrapped__ = original
    runpy.run_path = run_path

    def restore():
        if runpy.run_path is run_path:
            runpy.run_path = original
    engine._reverts.append(restore)


def boot_child():
    """Called by shims/startup/bootstrap/sitecustomize.py in processes started by a patched run."""
    from shims.startup import _boot
    engine = _boot.start()
    if engine is None or not engine.active or not engine._main_targets:
        return
    _wrap_run_path(engine)
    script = _script_from_argv()
    if script is not None:
        engine.watch_script(path=script)
