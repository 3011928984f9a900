"""Every built-in patch in every order of import / patch / unpatch (dd-trace-py's integration test template), with
`shims.testing.check_orderings`: the same check a plug-in's author runs.

The targets checked are the ones each PATCH declares (its receipt lists them), in the modules laid out below: DDP's
constructor in torch, and, for the frameworks, this suite's reference code laid out as the framework's package in a
temporary folder under the module names the patches look for, imported through the normal import system, so the
post-import hooks are what finds them. Enabled before and after the import, twice, disabled (`is` the original),
enabled again, disabled again: each target wrapped exactly once each time.
"""

from __future__ import annotations

import os
import shutil

import pytest

from shims import registry
from shims.testing import check_orderings
from tests.conftest import REPO

PATCHES = os.path.join(REPO, "tests", "patches")


def _package(root, dotted):
    folder = root
    for part in dotted.split("."):
        folder = folder / part
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
    return folder


def _detr(root):
    shutil.copy(os.path.join(PATCHES, "detr", "reference.py"), root / "lwdetr_engine.py")
    return ["lwdetr_engine"], {"SHIMS_DETR_MODULES": "lwdetr_engine"}


def _doctr(root):
    shutil.copy(os.path.join(PATCHES, "doctr", "loops", "buggy_single.py"), root / "train_pytorch.py")
    return ["train_pytorch"], {}


def _colossalai(root):
    reference = os.path.join(PATCHES, "colossalai", "reference")
    shutil.copy(os.path.join(reference, "low_level_optim.py"), _package(root, "colossalai.zero.low_level"))
    shutil.copy(os.path.join(reference, "gemini_ddp.py"), _package(root, "colossalai.zero.gemini"))
    return ["colossalai.zero.low_level.low_level_optim", "colossalai.zero.gemini.gemini_ddp"], {}


def _yolo(root):
    shutil.copy(os.path.join(PATCHES, "yolo", "yolov7_reference.py"), root / "yolov7_test.py")
    return ["yolov7_test"], {"SHIMS_YOLO_SITES": "yolov7_test:test"}


def _ddp(root):
    return ["torch.nn.parallel.distributed"], {}


# patch -> how to lay out its target modules in a folder: (modules to import, SHIMS_* options)
LAYOUTS = {"detr": _detr, "doctr": _doctr, "colossalai": _colossalai, "ddp": _ddp, "yolo": _yolo}

# what each patch declares in those modules, at least (a patch that lost a target fails here)
DECLARED = {
    "detr": {"lwdetr_engine:evaluate"},
    "doctr": {"train_pytorch:fit_one_epoch"},
    "colossalai": {"colossalai.zero.low_level.low_level_optim:LowLevelZeroOptimizer._attach_reduction_hook",
                   "colossalai.zero.low_level.low_level_optim:LowLevelZeroOptimizer.zero_grad",
                   "colossalai.zero.gemini.gemini_ddp:GeminiDDP.grad_handle"},
    "ddp": {"torch.nn.parallel.distributed:DistributedDataParallel.__init__"},
    "yolo": {"yolov7_test:test"},
}


def test_every_built_in_patch_has_an_orderings_case():
    assert sorted(p.name for p in registry.load() if registry.origin(p) == "shims") == sorted(LAYOUTS)


@pytest.mark.parametrize("patch", sorted(LAYOUTS))
def test_patch_unpatch_repatch_in_every_order(patch, tmp_path):
    modules, options = LAYOUTS[patch](tmp_path)
    result = check_orderings(patch, modules, options=options, path=[tmp_path, REPO], cwd=str(tmp_path),
                             env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert set(result.targets()) >= DECLARED[patch]
