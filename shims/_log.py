"""The `shims` logger, created on first use: `logging` costs more to import than all of `import shims.auto`."""

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
        _configure(_LOGGER)
    return _LOGGER
