"""The yolo patch on YOLOv5's `val.run` (the `yolov5` 7.0.14 package, and the same source as a clone's `val` module),
called as YOLOv5's train.py calls it: the EMA as `model`, `half=amp`, its ComputeLoss. YOLOv5 has no upstream fix: the
reference is the clone with ultralytics' fix (PR #24731) made in its text (tests/patches/yolo/yolov5_run.py)."""

from __future__ import annotations

import os

import pytest

from tests.patches.yolo.conftest import HERE, bitwise_equal, needs_cpu_half, recorded_run, yolov5_package

pytestmark = pytest.mark.slow
RUNNER = os.path.join(HERE, "yolov5_run.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder, cache = yolov5_package(), {}

    def run(*flags):
        if flags not in cache:
            cache[flags] = recorded_run(tmp_path_factory.mktemp("v5"), folder, *flags, runner=RUNNER)
        return cache[flags]
    return run


def test_the_package_on_the_cpu_passes_through(runs):
    """On the CPU YOLOv5 turns half off itself: the patched validation is the unpatched one, and the EMA is untouched."""
    plain, patched = runs("--variant", "package"), runs("--variant", "package", "--patched")
    assert patched["receipt"]["status"] == "applied"
    assert patched["receipt"]["counters"] == {"validations_passed_through": 1}
    assert patched["results"] == plain["results"]
    assert bitwise_equal(patched["after"], patched["before"]) and bitwise_equal(plain["after"], plain["before"])


def test_a_clone_s_half_path_keeps_the_ema_and_equals_the_fixed_loop(runs):
    """The clone's CPU check reads True (the stand-in for CUDA): patched, the EMA comes out bitwise as it went in and
    the results are those of the loop with the fix written in."""
    patched = runs("--variant", "clone", "--half-path", "--patched")
    fixed = runs("--variant", "fixed", "--half-path")
    assert bitwise_equal(patched["after"], patched["before"])
    assert patched["results"] == fixed["results"] and patched["maps"] == fixed["maps"]
    counters = patched["receipt"]["counters"]
    assert counters["validations_kept_float32"] == counters["model_half_prevented"] == 1
    assert counters["forwards_autocast"] >= 1 and counters["losses_autocast"] >= 1


@needs_cpu_half()
def test_a_clone_s_half_path_unpatched_rounds_the_ema(runs):
    buggy = runs("--variant", "clone", "--half-path")
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in buggy["before"].items()}
    assert bitwise_equal(buggy["after"], rounded) and not bitwise_equal(buggy["after"], buggy["before"])
