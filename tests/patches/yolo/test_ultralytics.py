"""The yolo patch on real ultralytics training runs (CPU): patched 8.4.61 validates as 8.4.62 does, bitwise.

8.4.61 is the last release whose `BaseValidator.__call__` casts the EMA with `model.half()`; 8.4.62 (PR #24731) keeps it
float32 under autocast. The two cannot share an environment: each run is a subprocess with one of them first on
PYTHONPATH (tests/patches/yolo/conftest.py). On the CPU ultralytics never takes the half path, so the runs force it
(`--force-half`: the stand-in for a CUDA device with AMP); autocast on the CPU is bfloat16 by torch's default and
float16 where this torch has the kernels. Each run trains YOLOv8n (from its yaml, no weights) on 8 synthetic images.
"""

from __future__ import annotations

import pytest
import torch

from tests.patches.yolo.conftest import BUGGY, FIXED, bitwise_equal, cpu_float16, needs_cpu_half, recorded_run

pytestmark = pytest.mark.slow
needs_fp16_half = needs_cpu_half()
AUTOCASTS = ["default", pytest.param("float16", marks=pytest.mark.skipif(not cpu_float16(autocast=True), reason=(
    f"torch {torch.__version__} has no float16 autocast on the CPU (bfloat16, its default, is tested)")))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def run(version, *flags):
        key = (version,) + flags
        if key not in cache:
            cache[key] = recorded_run(tmp_path_factory.mktemp("run"), version, *flags)
        return cache[key]
    return run


@pytest.mark.parametrize("autocast", AUTOCASTS)
def test_patched_validation_is_the_fixed_release_s(runs, autocast):
    fixed = runs(FIXED, "--force-half", "--autocast", autocast)
    patched = runs(BUGGY, "--force-half", "--autocast", autocast, "--patched")
    assert (fixed["version"], patched["version"]) == (FIXED, BUGGY)
    assert len(patched["epochs"]) == len(fixed["epochs"]) == 2
    for mine, theirs in zip(patched["epochs"], fixed["epochs"]):
        assert mine["metrics"] == theirs["metrics"] and mine["fitness"] == theirs["fitness"]
        assert bitwise_equal(mine["ema_after"], theirs["ema_after"])
        assert bitwise_equal(mine["ema_after"], mine["ema_before"])  # dtype and values as they went in
    assert bitwise_equal(patched["final_model"], fixed["final_model"])
    counters = patched["receipt"]["counters"]
    assert counters["validations_kept_float32"] == counters["model_half_prevented"] == 2
    assert counters["forwards_autocast"] >= 2 and counters["losses_autocast"] >= 2
    # the final validation of best.pt (no trainer: AutoBackend's own path) is left as written
    assert counters["validations_passed_through"] == 1


@needs_fp16_half
def test_unpatched_validation_rounds_the_ema_to_float16(runs):
    """The witness that the comparison above can fail: 8.4.61 as released."""
    fixed = runs(FIXED, "--force-half", "--autocast", "default")
    buggy = runs(BUGGY, "--force-half")
    assert len(buggy["epochs"]) == len(fixed["epochs"]) >= 2  # a validation per epoch was recorded
    for mine, theirs in zip(buggy["epochs"], fixed["epochs"]):
        rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in mine["ema_before"].items()}
        assert bitwise_equal(mine["ema_after"], rounded)  # model.half() then model.float(): float16 values
        assert not bitwise_equal(mine["ema_after"], mine["ema_before"])
        assert mine["metrics"] != theirs["metrics"]


def test_without_half_the_patch_passes_through(runs):
    """On the CPU ultralytics never asks for half: the patched run is the unpatched run, bitwise."""
    plain = runs(BUGGY)
    patched = runs(BUGGY, "--patched")
    assert len(patched["epochs"]) == len(plain["epochs"]) >= 2
    for mine, theirs in zip(patched["epochs"], plain["epochs"]):
        assert mine["metrics"] == theirs["metrics"] and bitwise_equal(mine["ema_after"], theirs["ema_after"])
    counters = patched["receipt"]["counters"]
    assert counters.get("model_half_prevented", 0) == 0 and counters["validations_passed_through"] == 3


def test_training_after_a_patched_half_validation_is_training_after_a_float32_one(runs):
    """The validation leaves the model and its EMA bitwise as they were (above); the training that follows is the
    training of the run whose validations ran in float32 (the CPU as it is), bitwise. (A run with val=False is no
    reference: ultralytics' loop differs there in more than the validation.)"""
    validated = runs(BUGGY, "--force-half", "--patched")
    float32 = runs(BUGGY)
    for mine, theirs in zip(validated["epochs"], float32["epochs"]):
        assert bitwise_equal(mine["ema_before"], theirs["ema_before"])
        assert bitwise_equal(mine["model_before"], theirs["model_before"])
    assert bitwise_equal(validated["final_model"], float32["final_model"])


@needs_fp16_half
def test_unpatched_validation_changes_the_training_that_follows(runs):
    buggy = runs(BUGGY, "--force-half")
    float32 = runs(BUGGY)
    assert not bitwise_equal(buggy["epochs"][-1]["ema_before"], float32["epochs"][-1]["ema_before"])


# ---------------------------------------------------------------- the inf case (ultralytics #24615)

BIG = ["--force-half", "--epochs", "3", "--big-weight", "74000"]  # above 65504: float16's largest
STEM = "model.0.bn.running_var"  # decays by BatchNorm's momentum (0.03) per step: 69629, 65516, 61646 at validations


@needs_fp16_half
def test_inf_case_unpatched_the_ema_becomes_inf_and_no_checkpoint_is_saved(runs):
    buggy = runs(BUGGY, *BIG)
    assert [e["saved"] for e in buggy["epochs"]] == [False, False, False]
    assert all(e["stem_var_after"] == float("inf") for e in buggy["epochs"])
    assert not buggy["last_saved"] and "no checkpoint was saved" in buggy["train_error"]


def test_inf_case_patched_the_ema_stays_finite_float32_and_is_saved(runs):
    patched = runs(BUGGY, *BIG, "--patched")
    fixed = runs(FIXED, *BIG)
    for mine, theirs in zip(patched["epochs"], fixed["epochs"]):
        assert mine["ema_after"][STEM].dtype == torch.float32
        assert bitwise_equal(mine["ema_after"], mine["ema_before"])
        assert bitwise_equal(mine["ema_after"], theirs["ema_after"]) and mine["metrics"] == theirs["metrics"]
    assert patched["epochs"][0]["stem_var_after"] > 65520  # still above float16's range after the validation
    # 8.4.61's save_model checks a float16 copy, so it skips while the weight is >= 65520 (8.4.62 clamps the copy,
    # same PR): saving resumes at the second epoch, where the float32 EMA came back into float16's range
    assert [e["saved"] for e in patched["epochs"]] == [False, True, True]
    assert [e["saved"] for e in fixed["epochs"]] == [True, True, True]
    assert patched["last_saved"] and "train_error" not in patched


def test_the_installed_ultralytics_is_patched_below_the_fix_and_left_alone_from_it():
    """Whatever ultralytics this environment has (8.0.239 in the oldest matrix row, the newest elsewhere)."""
    from packaging.version import Version

    import shims
    from shims import versions
    installed = versions.installed("ultralytics")
    if installed is None:
        pytest.skip("ultralytics is not installed here")
    pytest.importorskip("ultralytics.engine.validator",
                        reason=f"ultralytics {installed} keeps its validator in ultralytics.yolo.engine "
                               "(early 8.0 releases)")
    receipt = shims.enable(patches=["yolo"])
    target = receipt["patches"]["yolo"]["targets"]["ultralytics.engine.validator:BaseValidator.__call__"]
    expected = "fixed-upstream" if Version(installed) >= Version(FIXED) else "applied"
    assert target["status"] == expected, target
    if expected == "applied":
        from ultralytics.engine.validator import BaseValidator
        assert BaseValidator.__dict__["__call__"].__shims_original__ is not None
