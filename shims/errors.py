"""Exceptions a user can meet. Cheap to import: `import shims.auto` raises them at import time."""


class ShimsConfigError(ValueError):
    """An environment variable (or an argument to `shims.enable`) has a bad name or value.

    The message names the variable, the bad value and what would be valid.
    """


class ShimsPatchError(RuntimeError):
    """A patch could not apply and strict mode (`SHIMS_STRICT=1`) asked for an error instead of a skip."""
