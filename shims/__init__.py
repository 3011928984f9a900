"""shims: patch-in fixes for known, costly mistakes in PyTorch training and evaluation loops.

    import shims.auto                 # first line of a training script: patches apply as frameworks are imported
    python -m shims run script.py     # the same, without editing the script (children included)
    python -m shims list              # every patch, its target, versions, and whether it would apply here

Programmatic use: shims.enable(...), shims.disable(), shims.status(). Environment variables: see shims.config.
"""

from shims.errors import ShimsConfigError, ShimsPatchError

__version__ = "0.1.0"
__all__ = ["enable", "disable", "status", "observe", "ShimsConfigError", "ShimsPatchError", "__version__"]


def enable(patches=None, *, disable=None, mode=None, strict=None, report=None, log=None, options=None):
    """Enable patches; arguments override the SHIMS_* environment variables of the same meaning.

    patches: "all", "none" or names; disable: names to leave out; mode: "fix" | "detect" | "off"; strict: bool;
    report: path of the JSON receipt written at exit; log: logging level name; options: {"SHIMS_DOCTR_FUNCTIONS":
    "fit_one_epoch,train_epoch"} or {"doctr_functions": [...]}. Returns the receipt, as shims.status() does.
    """
    from shims import _boot, config
    overrides = config.overrides_from_arguments(patches=patches, disable=disable, mode=mode, strict=strict,
                                                report=report, log=log, options=options)
    _boot.start(overrides)
    return status()


def disable():
    """Revert every patch: each replaced attribute `is` the original object again."""
    from shims import engine
    engine.get().disable()


def observe(patches="none", ignore=()):
    """`with shims.observe() as report: ...`: the block runs in observe-only mode; then `report.findings` (typed,
    ranked by cost) and `report.summary`. See shims.doctor.observe."""
    from shims import doctor
    return doctor.observe(patches=patches, ignore=ignore)


def status():
    """The receipt: per patch, its status (applied, skipped, fixed-upstream, not-imported, disabled, error), why,
    the target's version, counters and findings. The same content as the SHIMS_REPORT JSON."""
    from shims import engine
    return engine.get().receipt.as_dict()
