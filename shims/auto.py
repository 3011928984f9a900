"""`import shims.auto`: read the environment, register the patches' import hooks, reach the script's functions.

Put it on the first line of a training script. It imports neither torch nor any framework: a patch applies when its
target module is imported, or, for a function the script defines (doctr's fit_one_epoch), right after its `def` runs.
A bad SHIMS_* variable raises shims.ShimsConfigError here, before anything is patched.
"""

from shims import _boot

_engine = _boot.start()
_frame = _boot.script_frame()
if _frame is not None:
    _engine.watch_script(frame=_frame)
del _frame
