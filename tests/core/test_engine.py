"""The engine with a fake patch: applied on import or at once, exactly once, reverted by disable, never crashing
the target's import; and what `import shims.auto` loads."""
from __future__ import annotations

import importlib
import json
import sys

import pytest

import shims
from shims.patch import Skip
from tests.conftest import run_python, write
from tests.core.conftest import TIMEOUT, fake_patch, enable, target_status, calls_counted


def test_import_shims_auto_does_not_import_torch():
    proc = run_python(["-c", "import shims.auto, sys; print('torch' in sys.modules, 'shims' in sys.modules)"],
                      timeout=TIMEOUT)
    assert proc.stdout.split() == ["False", "True"]


LOADED_BY_AUTO = """
import json, sys, sysconfig
before = set(sys.modules)
import shims.auto
site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
files = {m: getattr(sys.modules[m], "__file__", None) or "" for m in set(sys.modules) - before}
print(json.dumps({"loaded": sorted(files), "installed": sorted(m for m, f in files.items()
                                                              if any(f.startswith(s) for s in site))}))
"""


def test_import_shims_auto_loads_only_shims_wrapt_and_the_standard_library():
    # what it costs in milliseconds is measured by benchmarks/import_cost.py (never timed in a test); here: what it
    # loads. Of the installed packages only shims' own modules and wrapt (the runtime dependency for import hooks)
    proc = run_python(["-c", LOADED_BY_AUTO], timeout=TIMEOUT)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "shims.auto" in found["loaded"] and "wrapt" in found["loaded"]
    foreign = [m for m in found["installed"] if m.split(".")[0] not in ("shims", "wrapt")
               and not m.startswith(("__editable__", "_distutils_hack"))]
    assert foreign == [], f"import shims.auto loaded {foreign}"
    assert "torch" not in found["loaded"] and "numpy" not in found["loaded"]



def test_enabled_before_import_applies_on_import(target):
    receipt = enable(fake_patch(target))
    assert receipt["patches"]["fake"]["targets"][f"{target}:train"]["status"] == "not-imported"
    assert target not in sys.modules
    module = importlib.import_module(target)
    assert hasattr(module.train, "__shims_original__")
    assert module.train.__wrapped__ is module.train.__shims_original__
    assert module.train(3) == 6 and module.CALLS == [3] and calls_counted() == 1
    assert target_status(module=target)["status"] == "applied"
    assert not hasattr(module.evaluate, "__shims_original__")  # only the declared target changes


def test_enabled_after_import_applies_at_once(target):
    module = importlib.import_module(target)
    original = module.train
    enable(fake_patch(target))
    assert module.train is not original
    assert module.train.__wrapped__ is original and module.train.__shims_original__ is original
    assert module.train(2) == 4 and calls_counted() == 1


def test_enabling_twice_and_importing_twice_wrap_exactly_once(target):
    patch = fake_patch(target)
    enable(patch)
    module = importlib.import_module(target)
    original = module.train.__shims_original__
    enable(patch)  # the same configuration again
    importlib.import_module(target)  # a second import
    import_statement = __import__(target)
    assert import_statement is module
    enable(patch, SHIMS_STRICT="1")  # a different configuration: reverted, then applied again
    assert module.train.__wrapped__ is original and module.train.__shims_original__ is original
    module.train(1)
    assert calls_counted() == 1, "one wrapper layer: one count per call"
    shims.disable()
    assert module.train is original


def test_reloading_the_target_wraps_the_new_function_exactly_once(target):
    enable(fake_patch(target))
    module = importlib.import_module(target)
    module = importlib.reload(module)
    assert hasattr(module.train, "__shims_original__"), "the reloaded function is patched"
    assert not hasattr(module.train.__shims_original__, "__shims_original__"), "not a wrapper of the old wrapper"
    module.train(1)
    assert calls_counted() == 1
    assert target_status(module=target)["status"] == "applied"


def test_disable_restores_the_original_object_and_enable_works_again(target):
    module = importlib.import_module(target)
    original = module.train
    patch = fake_patch(target)
    enable(patch)
    assert module.train is not original
    shims.disable()
    assert module.train is original
    assert target_status(module=target)["status"] == "reverted"
    module.train(1)
    assert calls_counted() == 0
    enable(patch)
    assert module.train is not original and module.train.__wrapped__ is original
    module.train(1)
    assert calls_counted() == 1
    shims.disable()
    assert module.train is original


def test_disable_before_import_stops_patching(target):
    enable(fake_patch(target))
    shims.disable()
    module = importlib.import_module(target)
    assert not hasattr(module.train, "__shims_original__")


def test_a_method_target_is_replaced_and_restored(target, tmp_path):
    name = target + "_cls"
    write(tmp_path / f"{name}.py", """
        class Trainer:
            def step(self):
                return "step"
            @staticmethod
            def tag():
                return "tag"
    """)
    try:
        module = importlib.import_module(name)
        original_step, original_tag = module.Trainer.__dict__["step"], module.Trainer.__dict__["tag"]
        enable(fake_patch(name, targets=("Trainer.step", "Trainer.tag")))
        assert module.Trainer.__dict__["step"].__wrapped__ is original_step
        assert module.Trainer().step() == "step" and calls_counted() == 1
        assert module.Trainer.__dict__["tag"].__shims_original__ is original_tag  # the staticmethod object itself
        shims.disable()
        assert module.Trainer.__dict__["step"] is original_step and module.Trainer.__dict__["tag"] is original_tag
        assert module.Trainer.tag() == "tag" and module.Trainer().step() == "step"
    finally:
        sys.modules.pop(name, None)


def raising_replace(original, ctx):
    raise RuntimeError("boom in replace 42")


@pytest.mark.parametrize("when", ["enable-then-import", "import-then-enable"])
def test_a_failing_patch_leaves_the_target_as_it_was(target, when):
    if when == "import-then-enable":
        module = importlib.import_module(target)
        original = module.train
        enable(fake_patch(target, replace=raising_replace))
    else:
        enable(fake_patch(target, replace=raising_replace))
        module = importlib.import_module(target)  # the user's import never fails
        original = module.train
    assert module.train is original and not hasattr(module.train, "__shims_original__") and module.train(5) == 10
    status = target_status(module=target)
    assert status["status"] == "error" and "RuntimeError: boom in replace 42" in status["reason"]
    assert target_status()["status"] == "error" and "boom in replace 42" in target_status()["reason"]


@pytest.mark.parametrize("when", ["enable-then-import", "import-then-enable"])
def test_a_failing_patch_raises_in_strict_mode(target, when):
    patch = fake_patch(target, replace=raising_replace)
    if when == "import-then-enable":
        importlib.import_module(target)
        with pytest.raises(shims.ShimsPatchError, match="'fake'.*boom in replace 42"):
            enable(patch, SHIMS_STRICT="1")
    else:
        enable(patch, SHIMS_STRICT="1")
        with pytest.raises(shims.ShimsPatchError, match="'fake'.*boom in replace 42"):
            importlib.import_module(target)


def skipping_replace(original, ctx):
    raise Skip("the loop has an unexpected shape")


def test_skip_is_recorded_with_its_reason_and_other_patches_still_apply(target):
    module = importlib.import_module(target)
    original = module.train
    enable(fake_patch(target, replace=skipping_replace),
           fake_patch(target, name="other", targets=("evaluate",)))
    assert module.train is original
    status = target_status(module=target)
    assert status == {"status": "skipped", "reason": "the loop has an unexpected shape"}
    assert target_status("other")["status"] == "applied" and hasattr(module.evaluate, "__shims_original__")


def test_skip_raises_in_strict_mode_naming_the_patch(target):
    importlib.import_module(target)
    with pytest.raises(shims.ShimsPatchError, match=r"'fake'.*unexpected shape.*SHIMS_STRICT"):
        enable(fake_patch(target, replace=skipping_replace), SHIMS_STRICT="1")


def test_skip_as_fixed_upstream_never_raises_even_in_strict_mode(target):
    def already_fixed(original, ctx):
        raise Skip("upstream removed the bug", status="fixed-upstream")

    enable(fake_patch(target, replace=already_fixed), SHIMS_STRICT="1")
    module = importlib.import_module(target)
    assert not hasattr(module.train, "__shims_original__")
    assert target_status(module=target) == {"status": "fixed-upstream", "reason": "upstream removed the bug"}
