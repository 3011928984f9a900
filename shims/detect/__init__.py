"""Observe-only mode: `SHIMS_MODE=detect` / `python -m shims doctor script.py ARGS`.

Generic detectors watch any training or evaluation loop, with no framework name, and change nothing it computes.
Every finding names the call site in the user's code, how often it happened, a measured cost where one can be
measured (else an estimate, said so) and what fixes it. docs/detect.md lists the kinds and how to add a detector.

    detector.py    what a detector declares (Detector) and accumulates per finding (Finding)
    core.py        the Session every detector shares: events, step clock, wrapping, findings, receipt
    compat.py      the torch APIs it needs, feature-detected (torch 2.0 to the newest), with their fallbacks
    sites.py       call-site attribution        graphs.py   did a backward reach this graph; what it saves
    tensors.py     questions about tensors       report.py   cost units and the findings table
    detectors/     one module per detector, each defining DETECTOR (a core.Detector subclass)

The engine calls `install(engine)` once torch is imported in detect mode (Engine._install_detectors, the only way in);
it returns the revert callable. Importing this package imports neither torch nor any detector's dependencies.
"""

from __future__ import annotations

# the detectors, in the order they are installed and their findings' kinds are listed
DETECTOR_MODULES = (
    "forwards",     # unused-forward, eval-with-grad: forwards whose autograd graph no backward used (doctr #1861)
    "half",         # half-eval: .half() on a module with normalisation layers, then evaluated (RF-DETR <= 1.5)
    "param_hooks",  # hook-in-autograd-grad, hook-fired-twice: parameter tensor hooks (ColossalAI #5601)
    "host_sync",    # host-sync: host reads of accelerator tensors in most steps
    "dataloaders",  # dataloader-workers, dataloader-pin-memory: DataLoaders feeding accelerator training
    "create_graph",  # create-graph-unused: autograd.grad(create_graph=True) whose derivatives no backward used
    "zero_grad",    # zero-grad-filled: zero_grad(set_to_none=False) zero-fills gradients instead of releasing them
    "conv_bias",    # conv-bias-batchnorm: a convolution's bias cancelled by the BatchNorm it feeds
    "float32_training",  # float32-no-autocast: float32 matmuls/convs outside autocast on a tensor-core device
    "grad_scaler",  # float16-no-grad-scaler: backward after float16 autocast with no GradScaler
    "device_copies",  # data-copied-every-epoch: the same host data copied to the device again, though it would fit
    "optimizers",   # optimizer-for-loop: an optimizer updating accelerator parameters one tensor at a time
    "profile",      # no kinds: doctor --profile N / SHIMS_PROFILE_STEPS, torch.profiler over N optimizer steps
)

_CLASSES = None
_BROKEN = {}  # module name -> "ExceptionType: message" for detector modules that failed to import
_CURRENT = None  # the active Session (one per process)


def detector_classes():
    """The Detector classes, in DETECTOR_MODULES order; a module that fails to import is left out (see broken())."""
    global _CLASSES
    if _CLASSES is None:
        import importlib
        classes = []
        for name in DETECTOR_MODULES:
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
    session = Session(engine, detector_classes())
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
