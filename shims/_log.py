"""The `shims` logger, created on first use: `logging` costs more to import than all of `import shims.auto`.

Its records stay in the `shims` logger: they never propagate to the root logger, whose level and handlers belong to
the application (timm, for one, sets the root logger to INFO: every receipt line would be printed again, once per
process). With SHIMS_LOG set, shims' own handler prints at that level on stderr; without it, only warnings and
errors reach stderr (Python's handler of last resort).
"""

_LOGGER = None
_LEVEL = None  # set by the engine from SHIMS_LOG before the first message


def set_level(level):
    global _LEVEL
    _LEVEL = level
    if _LOGGER is not None:
        _configure(_LOGGER)


def _configure(log):
    import logging
    if _LEVEL:
        log.setLevel(getattr(logging, _LEVEL))
        if not any(getattr(h, "_shims", False) for h in log.handlers):
            handler = logging.StreamHandler()  # stderr
            handler.setFormatter(logging.Formatter("[shims %(levelname)s] %(message)s"))
            handler._shims = True
            log.addHandler(handler)


def logger():
    global _LOGGER
    if _LOGGER is None:
        import logging
        _LOGGER = logging.getLogger("shims")
        _LOGGER.propagate = False
        _configure(_LOGGER)
    return _LOGGER


def process_label():
    """`pid 1234` and, in a distributed run, `rank 1` (from the launcher's RANK, or torch.distributed once set up)."""
    import os
    import sys
    rank = os.environ.get("RANK")
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank = str(dist.get_rank())
    except Exception:  # noqa: BLE001 - a label must never fail the exit
        pass
    return f"pid {os.getpid()}" + (f", rank {rank}" if rank not in (None, "") else "")


def log_receipt(receipt):
    """The receipt at exit: one INFO line for this process, with its pid and rank."""
    lines = receipt.summary_lines()
    if lines:
        logger().info("receipt (%s): %s", process_label(), "; ".join(lines))
