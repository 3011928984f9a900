"""`import shims.auto`: read the environment, register the patches' import hooks, reach the script's functions.

Put it on the first line of a training script. It imports neither torch nor any framework: a patch applies when its
target module is imported, or, for a function the script defines (doctr's fit_one_epoch), right after its `def` runs.
A bad SHIMS_* variable raises shims.ShimsConfigError here, before anything is patched.
"""

from shims.startup import _boot

_engine = _boot.start()
_boot.reach_script(_engine)  # on 3.9-3.11 this may run the rest of the script itself: docs/startup.md
