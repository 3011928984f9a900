"""Start shims from the environment (what `import shims.auto`, `python -m shims run` and child processes share)."""

from __future__ import annotations


def start(overrides=None, shown=None):
    """Parse the environment (plus `overrides`; `shown` names the arguments they came from in errors), enable the
    engine, return it. Raises ShimsConfigError on bad input, before anything is patched."""
    from shims import config, engine, registry
    patches = registry.load()
    cfg = config.from_environment(patches, overrides, shown)
    return engine.get().enable(cfg, patches)


def script_frame():
    """The module-level frame of the script that is importing shims (a __main__ or __mp_main__ script), or None."""
    import sys
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if frame.f_code.co_name == "<module>" and name in ("__main__", "__mp_main__"):
            return frame
        frame = frame.f_back
    return None


def reach_script(engine):
    """Called by shims.auto: reach the functions of the script importing it. On Python 3.9-3.11, when the import is
    a top-level statement of the script the interpreter runs, the rest of the script runs here, compiled with no
    tracer, and this never returns (shims/startup/takeover.py); otherwise the script's module code is watched."""
    import sys
    frame = script_frame()
    if frame is None:
        return
    if sys.version_info < (3, 12):
        from shims.startup import takeover
        rest = takeover.plan(engine, sys._getframe(1), frame)
        if rest is not None:
            rest.run()
    engine.watch_script(frame=frame)
