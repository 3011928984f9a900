"""The one place that knows the list of patches. Each module in `shims.patches` defines `PATCH` (a shims.patch.Patch).

Patch modules import only `shims.patch` at module level (their heavy imports live inside functions), so loading the
registry is cheap enough for `import shims.auto`.
"""

from __future__ import annotations

PATCH_MODULES = (
    "doctr",        # duplicate forward in fit_one_epoch (doctr #1861, fixed by #1862)
    "detr",         # model.half() in fp16_eval evaluation (RF-DETR <= 1.5, LW-DETR)
    "ddp",          # find_unused_parameters=True policy (DAMO-YOLO, any DDP)
    "colossalai",   # gradient-reduction tensor hooks fired by autograd.grad (ColossalAI #5601)
    "yolo",         # model.half() on the live EMA in validation (ultralytics < 8.4.62 #24615, YOLOv5, YOLOv7)
)

_LOADED = None
_BROKEN = {}  # name -> "ExceptionType: message" for patch modules that failed to import


def load():
    """The tuple of Patch declarations, in the order above. A module that fails to import is left out and reported
    (`broken()`), so one bad patch never takes the others down."""
    global _LOADED
    if _LOADED is None:
        import importlib
        _patches_from_source_checkout()
        patches = []
        for name in PATCH_MODULES:
            try:
                patches.append(importlib.import_module(f"shims.patches.{name}").PATCH)
            except Exception as exc:  # noqa: BLE001 - recorded in the receipt, raised in strict mode
                _BROKEN[name] = f"{type(exc).__name__}: {exc}"
        _LOADED = tuple(patches)
    return _LOADED


def _patches_from_source_checkout():
    """In a source checkout on PYTHONPATH (not installed), `patches/` beside `shims/` is loaded as `shims.patches`,
    the name an installation gives it; never as a top-level `patches`."""
    import os
    import sys
    if "shims.patches" in sys.modules:
        return
    import importlib.util
    if importlib.util.find_spec("shims.patches") is not None:
        return  # installed (or an editable install maps it)
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("shims.patches", init, submodule_search_locations=[source])
    module = importlib.util.module_from_spec(spec)
    sys.modules["shims.patches"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - load() reports each patch module that then fails
        del sys.modules["shims.patches"]
        return
    sys.modules["shims"].patches = module


def broken():
    load()
    return dict(_BROKEN)
