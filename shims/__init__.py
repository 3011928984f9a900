"""shims: patch-in fixes for known, costly mistakes in PyTorch training and evaluation loops.

    import shims.auto                 # first line of a training script: patches apply as frameworks are imported
    python -m shims run train.py      # the same, without editing the script (children included); also
                                      # `run python train.py`, `run -m pkg.train`, `run torchrun ...`
    python -m shims list              # every patch, its targets, versions, and whether it would apply here

Programmatic use: shims.enable(...), shims.disable(), shims.status(). Environment variables: see shims.config.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Union

from shims.errors import ShimsConfigError, ShimsPatchError
from shims.receipt import ReceiptData  # the layout of status(): TypedDicts (typing is loaded by wrapt anyway)

__version__ = "0.1.0"
__all__ = ["enable", "disable", "status", "observe", "ShimsConfigError", "ShimsPatchError", "ReceiptData",
           "__version__"]


def enable(patches: Union[str, Iterable[str], None] = None, *, disable: Union[str, Iterable[str], None] = None,
           mode: Optional[str] = None, strict: Optional[bool] = None,
           report: Union[str, "os.PathLike[str]", None] = None, log: Optional[str] = None,
           options: Optional[Mapping[str, Union[str, int, Iterable[str]]]] = None) -> ReceiptData:
    """Enable patches; arguments override the SHIMS_* environment variables of the same meaning.

    patches: "all", "none" or names; disable: names to leave out; mode: "fix" | "detect" | "off"; strict: bool;
    report: path of the JSON receipt written at exit; log: logging level name; options: {"SHIMS_DOCTR_FUNCTIONS":
    "fit_one_epoch,train_epoch"} or {"doctr_functions": [...]}. Returns the receipt, as shims.status() does.
    A bad value raises ShimsConfigError naming the argument it came from (`shims.enable(patches=[...])`), before
    anything is patched.
    """
    from shims import config
    from shims.startup import _boot
    overrides, shown = config.overrides_from_arguments(patches=patches, disable=disable, mode=mode, strict=strict,
                                                       report=report, log=log, options=options)
    _boot.start(overrides, shown)
    return status()


def disable() -> None:
    """Revert every patch: each replaced attribute `is` the original object again."""
    from shims import engine
    engine.get().disable()


def observe(patches: Union[str, Iterable[str]] = "none", ignore: Iterable[tuple] = ()):
    """`with shims.observe() as report: ...`: the block runs in observe-only mode; then `report.findings` (typed,
    ranked by cost) and `report.summary`. See shims.doctor.observe."""
    from shims import doctor
    return doctor.observe(patches=patches, ignore=ignore)


def status() -> ReceiptData:
    """The receipt: per patch, its status (applied, skipped, fixed-upstream, not-imported, disabled, error), why,
    the target's version, counters and findings. The same content as the SHIMS_REPORT JSON; its layout is
    `shims.receipt.ReceiptData` (TypedDicts)."""
    from shims import engine
    return engine.get().receipt.as_dict()
