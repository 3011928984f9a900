"""Every patch in every order of import / patch / unpatch (dd-trace-py's integration test template).

For each patch, in a fresh interpreter (a module can be imported for the first time only once per process), shims is
enabled before or after the target's module is imported, then: enabled again and the module imported again (nothing
is wrapped twice), disabled (the attribute `is` the original), enabled again (patched again), disabled again. The
targets are the patches' real targets: DDP's constructor in torch, and, for the frameworks, modules under the names
the patches look for (the reference code of these tests, laid out as the framework's package in a temporary folder,
imported through the normal import system, so the post-import hooks are what finds them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# patch -> (module to import, owner path inside it, attribute, SHIMS_* options)
CASES = {
    "ddp": ("torch.nn.parallel.distributed", ["DistributedDataParallel"], "__init__", {}),
    "detr": ("lwdetr_engine", [], "evaluate", {"SHIMS_DETR_MODULES": "lwdetr_engine"}),
    "doctr": ("train_pytorch", [], "fit_one_epoch", {}),
    "colossalai": ("colossalai.zero.low_level.low_level_optim", ["LowLevelZeroOptimizer"], "zero_grad", {}),
    "yolo": ("yolov7_test", [], "test", {"SHIMS_YOLO_SITES": "yolov7_test:test"}),
}

SCRIPT = r"""
import importlib, json, sys
import shims

order, patch, module_name, owner_path, attr, options = json.loads(sys.argv[1])
if patch == "ddp":
    import torch  # noqa: F401 - torch itself is always imported first; its DDP module is the target

def lookup():
    owner = sys.modules[module_name]
    for part in owner_path:
        owner = getattr(owner, part)
    return owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

def enable():
    receipt = shims.enable(patches=[patch], options=options)
    return receipt["patches"][patch]["targets"]

def layers(obj):
    n = 0
    while getattr(obj, "__shims_original__", None) is not None:
        obj, n = obj.__shims_original__, n + 1
    return n

seen = {}
if order == "after":
    importlib.import_module(module_name)
    original = lookup()
    enable()
else:
    enable()
    assert module_name not in sys.modules or patch == "ddp", module_name
    importlib.import_module(module_name)
    original = getattr(lookup(), "__shims_original__", None)
patched = lookup()
seen["patched"] = patched is not original and patched.__shims_original__ is original
seen["layers"] = layers(patched)
targets = enable()  # the same configuration again
importlib.import_module(module_name)  # and a second import
seen["same_after_second_enable"] = lookup() is patched
seen["status"] = sorted({t["status"] for t in targets.values() if t["status"] != "not-imported"})
shims.disable()
seen["reverted"] = lookup() is original
enable()
seen["patched_again"] = lookup() is not original and lookup().__shims_original__ is original
seen["layers_again"] = layers(lookup())
shims.disable()
seen["reverted_again"] = lookup() is original
print(json.dumps(seen))
"""


def _lay_out(patch, root):
    """The target module of `patch` under the name the patch looks for, in `root` (a folder put on sys.path)."""
    if patch == "detr":
        shutil.copy(os.path.join(TESTS, "detr_reference.py"), root / "lwdetr_engine.py")
    elif patch == "doctr":
        shutil.copytree(os.path.join(TESTS, "doctr_loops"), root / "tests" / "doctr_loops")
        (root / "tests" / "__init__.py").write_text("")
        shutil.copy(os.path.join(TESTS, "doctr_loops", "buggy_single.py"), root / "train_pytorch.py")
    elif patch == "yolo":
        shutil.copy(os.path.join(TESTS, "patches", "yolo", "yolov7_reference.py"), root / "yolov7_test.py")
    elif patch == "colossalai":
        package = root / "colossalai" / "zero" / "low_level"
        package.mkdir(parents=True)
        for folder in (root / "colossalai", root / "colossalai" / "zero", package):
            (folder / "__init__.py").write_text("")
        shutil.copy(os.path.join(TESTS, "colossalai_reference", "low_level_optim.py"), package / "low_level_optim.py")


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("patch", sorted(CASES))
def test_patch_unpatch_repatch_in_every_order(patch, order, tmp_path):
    module_name, owner_path, attr, options = CASES[patch]
    _lay_out(patch, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT,
                           json.dumps([order, patch, module_name, owner_path, attr, options])],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"patched": True, "layers": 1, "same_after_second_enable": True, "status": ["applied"],
                    "reverted": True, "patched_again": True, "layers_again": 1, "reverted_again": True}, seen
