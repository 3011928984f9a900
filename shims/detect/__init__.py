"""Observe-only mode: `SHIMS_MODE=detect` / `python -m shims doctor script.py ARGS`.

Generic detectors watch any training or evaluation loop, with no framework name, and change nothing it computes.
Every finding names the call site in the user's code, how often it happened, a measured cost where one can be
measured (else an estimate, said so) and what fixes it. docs/detect.md lists the kinds and how to add a detector.

    detector.py    what a detector declares (Detector) and accumulates per finding (Finding)
    core.py        the Session every detector shares: events, step clock, wrapping, findings, receipt
    compat.py      the torch APIs it needs, feature-detected (torch 2.0 to the newest), with their fallbacks
    sites.py       call-site attribution        graphs.py   did a backward reach this graph; what it saves
    tensors.py     questions about tensors       report.py   cost units and the findings table
    observed.py    what was observed (steps, forwards, evaluations, the timeline)
    results.py     the doctor's report (merged, suppressed, ranked, summarised); sarif.py and html.py write it
    profiling.py   doctor --profile N: torch.profiler over N optimizer steps (not a detector: it finds nothing)
    detectors/     one module per detector, each defining DETECTOR (a Detector subclass): being there is enough

The engine calls `install(engine)` once torch is imported in detect mode (Engine._install_detectors, the only way in);
it returns the revert callable. Importing this package imports neither torch nor any detector's dependencies.
"""

from __future__ import annotations

_CLASSES = None
_BROKEN = {}  # module name -> "ExceptionType: message" for detector modules that failed to import
_CURRENT = None  # the active Session (one per process)


def detector_modules():
    """The names of the modules in shims/detect/detectors/, sorted: a detector is found by being there."""
    import pkgutil
    from shims.detect import detectors
    return tuple(sorted(info.name for info in pkgutil.iter_modules(detectors.__path__) if not info.ispkg
                        and not info.name.startswith("_")))


def detector_classes():
    """The Detector classes of detector_modules(); a module that fails to import is left out (see broken())."""
    global _CLASSES
    if _CLASSES is None:
        import importlib
        classes = []
        for name in detector_modules():
            try:
                classes.append(importlib.import_module(f"shims.detect.detectors.{name}").DETECTOR)
            except Exception as exc:  # noqa: BLE001 - recorded in the receipt at install
                _BROKEN[name] = f"{type(exc).__name__}: {exc}"
        _CLASSES = tuple(classes)
    return _CLASSES


def broken():
    detector_classes()
    return dict(_BROKEN)


def kinds():
    """kind -> what it means, for every detector (the doctor table, docs/detect.md and tests read this)."""
    merged = {}
    for cls in detector_classes():
        merged.update(cls.kinds)
    return merged


def __getattr__(name):
    if name == "KINDS":  # computed on use: importing shims.detect.report (the doctor CLI) loads no detector
        return kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(engine):
    """Install the detectors for `engine` (called once torch is imported, in detect mode). Returns the revert."""
    global _CURRENT
    from shims.detect.core import TARGET, Session
    if _CURRENT is not None and _CURRENT.active:
        _CURRENT.revert()
    from shims.detect.profiling import Profile  # not a detector (it finds nothing): it rides the same step clock
    session = Session(engine, detector_classes() + (Profile,))
    for name, problem in broken().items():
        session.record.target(f"{TARGET}.{name}", "error", f"detector module failed to import: {problem}")
    session.start()
    _CURRENT = session
    from shims import config
    path = engine.report_path()
    if path and config.is_child() and _runs_a_script():
        from shims.detect import report
        report.mark_started(path)  # the doctor waits for this process's report (bounded)
    return session.revert


def _runs_a_script():
    """Whether this process runs a script of the user's (rank 1 of Lightning's strategy="ddp" runs the training
    script again), not a helper that lives in an installed package (a compiler's worker pool, which outlives the
    script: the doctor must not wait for it)."""
    import os
    import sys
    first = sys.argv[0] if getattr(sys, "argv", None) else ""
    where = first.replace(os.sep, "/")
    return first.endswith(".py") and os.path.isfile(first) and "/site-packages/" not in where \
        and "/dist-packages/" not in where


def flush(final=False):
    """Write what the detectors know into the receipt now. `final`: the run is over (also judge the autograd graphs
    still alive, and write the whole-run findings). Called at exit and by shims.disable(); safe to call twice."""
    session = _CURRENT
    if session is not None:
        session.flush(final=final)
