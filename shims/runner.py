"""Running scripts with shims: `python -m shims run script.py ARGS`, and the processes a patched run starts.

Children inherit SHIMS_* variables and `shims/startup/bootstrap` on PYTHONPATH (config.export_for_children), so their
`sitecustomize` calls `boot_child()`: enable from the environment, then reach the script's functions in whichever way
the child runs it (a torchrun worker runs it as a file; a multiprocessing spawn child runs it through
`runpy.run_path(path, run_name="__mp_main__")`).
"""

from __future__ import annotations

import os
import sys


class CommandError(Exception):
    """A command `run`/`doctor` cannot start; `status` is the exit status (Python's 2 for a missing script)."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def _same_interpreter(path):
    """Whether `path` is this interpreter (the same environment: same folder and the same binary), so a command
    `python script.py` can run here, in this process, exactly as that interpreter would run it."""
    if not path:
        return False
    here = os.path.abspath(sys.executable)
    return (os.path.dirname(os.path.abspath(path)) == os.path.dirname(here)
            and os.path.realpath(path) == os.path.realpath(here))


def _shebang_interpreter(path):
    """The interpreter a script's `#!` line names (`#!/usr/bin/env python3` looked up on PATH), or None."""
    import shlex
    import shutil
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = shlex.split(first[2:].decode("utf-8", "replace"))
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
        return shutil.which(words[0]) if words else None
    return words[0] if words else None


def plan(words):
    """What a `run`/`doctor` COMMAND is: ("script", path, args), ("module", name, args) or ("exec", argv).

    A script (a .py file, a directory or zip with __main__.py, or any file a Python shebang of this interpreter
    starts, like the `torchrun` and `accelerate` console scripts) and `-m module` run in this process; `python ...`
    naming this interpreter is read as this interpreter would read it; anything else is started as a command whose
    Python processes start shims from the environment (sitecustomize), as `ddtrace-run` and
    `opentelemetry-instrument` do."""
    import shutil
    if not words:
        raise CommandError("expected a script, -m module, or a command")
    first, rest = words[0], list(words[1:])
    if first == "-m" or (first.startswith("-m") and len(first) > 2):
        name = first[2:] or (rest.pop(0) if rest else "")
        if not name:
            raise CommandError("-m needs a module name (e.g. -m pkg.train)")
        return ("module", name, rest)
    if first.startswith("-"):
        raise CommandError(f"unknown option {first!r}; expected a script, -m module, or a command (put `--` before "
                           "a command that starts with -)")
    if os.path.exists(first):
        if os.path.isdir(first) or first.endswith((".py", ".pyw", ".pyz", ".zip")) \
                or not os.access(first, os.X_OK) or _same_interpreter(_shebang_interpreter(first)):
            return ("script", first, rest)
        return ("exec", [os.path.abspath(first) if os.sep not in first else first, *rest])
    found = shutil.which(first) if os.sep not in first else None
    if found is None:
        if os.sep in first or first.endswith(".py"):
            raise CommandError(f"can't open file {os.path.abspath(first)!r}: [Errno 2] No such file or directory")
        raise CommandError(f"{first!r} is neither a file nor a command on PATH", status=127)  # as env(1) exits
    if _same_interpreter(found):
        options = rest
        if options and not options[0].startswith("-"):
            return plan(options)  # `python script.py ARGS`: the script, here
        if options and (options[0] == "-m" or options[0].startswith("-m")):
            return plan(options)  # `python -m module ARGS`
        return ("exec", [found, *rest])  # interpreter options (-u, -X, -c ...): that interpreter runs it
    if _same_interpreter(_shebang_interpreter(found)):
        return ("script", found, rest)  # a console script of this environment (torchrun, accelerate)
    return ("exec", [found, *rest])


def _is_machinery(filename):
    """Frames of the machinery between the command line and the user's code: shims' own and runpy's."""
    import runpy
    shims_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return (filename.startswith(shims_dir) or filename == runpy.__file__ or filename.startswith("<frozen ")
            or os.path.basename(filename) == "runpy.py")


def _user_traceback(tb):
    """The traceback `python script.py` would show: from the first frame of the user's code; for `-m`, from runpy's
    `_run_module_as_main`, as `python -m module` shows it."""
    first = tb
    while tb is not None and _is_machinery(tb.tb_frame.f_code.co_filename):
        if tb.tb_frame.f_code.co_name == "_run_module_as_main" and not tb.tb_frame.f_code.co_filename.startswith(
                os.path.dirname(os.path.abspath(__file__))):
            return tb
        tb = tb.tb_next
    return tb if tb is not None or first is None else None


def _quiet_hook(*args):
    return None


def report_uncaught(exc):
    """Show an exception that left the user's code as Python would (sys.excepthook, the traceback starting at the
    user's first frame). Returns False where sys.excepthook is missing or not callable: then the caller lets the
    exception go on, and Python reports it in its own way."""
    hook = getattr(sys, "excepthook", None)
    if not callable(hook):
        return False
    tb = _user_traceback(exc.__traceback__)
    hook(type(exc), exc.with_traceback(tb), tb)
    return True


def _main_module(path):
    """A fresh `__main__` module for a script, with the globals `python script.py` gives it."""
    import builtins
    import importlib.machinery
    import types
    module = types.ModuleType("__main__")
    module.__dict__.update(__package__=None, __loader__=importlib.machinery.SourceFileLoader("__main__", path),
                           __spec__=None, __annotations__={}, __builtins__=builtins, __file__=path, __cached__=None)
    sys.modules["__main__"] = module
    return module


def _bare_main_module():
    """A fresh `__main__` for `-m`: runpy fills in its globals, as for `python -m`."""
    import builtins
    import types
    module = types.ModuleType("__main__")
    module.__dict__.update(__annotations__={}, __builtins__=builtins)
    sys.modules["__main__"] = module
    return module


def _script_code(engine, path):
    """(code, globals to add, stop) for a script: compiled with the calls that hand its target functions to the
    engine right after their `def` (shims/startup/mainwatch.py: no tracer) where it defines any; otherwise as Python
    compiles it (a SyntaxError is raised as Python reports it)."""
    from shims.startup import mainwatch
    key = os.path.realpath(path)
    if engine is not None and engine.active and engine.main_names() \
            and not isinstance(mainwatch._WATCHED.get(key), mainwatch.ScriptWatch):
        code, _ = mainwatch.compile_watched(path, engine.main_names())
        if code is not None:
            watch = mainwatch.CompiledWatch(engine, path)
            mainwatch._WATCHED[key] = watch
            engine._watches.append(watch)
            return code, {}, watch.stop
    with open(path, "rb") as f:
        source = f.read()
    return compile(source, path, "exec", dont_inherit=True), {}, None


def _run_file(engine, path, args):
    """`python path args` in this process: absolute __file__, sys.argv as typed, sys.path[0] the script's (real)
    folder, a fresh __main__ module."""
    absolute = os.path.abspath(path)
    sys.argv = [path, *args]
    if os.path.isdir(path) or not os.path.isfile(path) or path.endswith((".pyz", ".zip")):
        import runpy
        from shims.startup import mainwatch
        sys.path[0] = absolute  # a directory or zip is its own sys.path[0], as with `python dir`
        mainwatch.run_path(engine, absolute, run_name="__main__", fallback=runpy.run_path)
        return
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    code, extra, stop = _script_code(engine, absolute)
    module = _main_module(absolute)
    module.__dict__.update(extra)
    try:
        exec(code, module.__dict__)
    finally:
        if stop is not None:
            stop()


def _run_module(engine, name, args):
    """`python -m name args` in this process: sys.path[0] the working directory, runpy's own __main__ path."""
    import importlib.util
    import runpy
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *args]  # runpy puts the module's file in sys.argv[0], as `python -m` does
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise CommandError(f"Error while finding module specification for {name!r} ({type(exc).__name__}: {exc})",
                           status=1) from None
    if spec is None:
        raise CommandError(f"No module named {name}", status=1)  # Python's message and status for `python -m nope`
    if engine is not None and engine.active and spec.origin and os.path.isfile(spec.origin):
        engine.watch_script(path=spec.origin)
    _bare_main_module()
    run_as_main = getattr(runpy, "_run_module_as_main", None)  # what `python -m` calls (CPython 3.9-3.13)
    if run_as_main is not None:
        run_as_main(name, alter_argv=True)
    else:
        runpy.run_module(name, run_name="__main__", alter_sys=True)


def run_command(words, replace_process=True):
    """Run a `run`/`doctor` COMMAND (see `plan`) with shims enabled. A script or module run here ends as Python ends
    it (its SystemExit and exceptions go on, reported from the user's first frame); returns 0 when it returns.
    Another program replaces this process (`replace_process`, as ddtrace-run does: its pid, signals and exit status
    are the program's own), or runs as a child whose exit status is returned (negative: killed by that signal).
    Raises CommandError when nothing can start."""
    from shims.startup import _boot
    what = plan(words)
    engine = _boot.start()
    if what[0] == "exec":
        if replace_process:
            _replace_process(what[1])
        return _run_program(what[1])
    try:
        if what[0] == "module":
            _run_module(engine, what[1], what[2])
        else:
            _run_file(engine, what[1], what[2])
    except (SystemExit, CommandError):
        raise
    except BaseException as exc:  # noqa: BLE001 - shown as Python shows it, then Python ends the process with it
        if report_uncaught(exc):
            sys.excepthook = _quiet_hook  # already shown: Python's own ending (status 1, or SIGINT) stays
        raise
    return 0


def _replace_process(argv):
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except PermissionError as exc:
        raise CommandError(f"cannot run {argv[0]!r}: {exc}", status=126) from None  # as env(1) exits
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]!r}: {exc}", status=127) from None


def _run_program(argv):
    """Start another program with shims exported to its Python processes; its exit status and signals are ours."""
    import signal
    import subprocess
    try:
        child = subprocess.Popen(argv)
    except PermissionError as exc:
        raise CommandError(f"cannot run {argv[0]!r}: {exc}", status=126) from None
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]!r}: {exc}", status=127) from None
    forwarded = {}

    def forward(signum, frame):
        child.send_signal(signum)
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            try:
                forwarded[signum] = signal.signal(signum, forward)
            except (ValueError, OSError):
                pass
    try:
        status = child.wait()
    finally:
        for signum, previous in forwarded.items():
            signal.signal(signum, previous)
    return status


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
