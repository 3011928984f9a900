"""The yolo patch on a YOLOv7-style `test.test` (tests/patches/yolo/yolov7_reference.py, written in YOLOv7's
structure), and the patch's own contract: fingerprint, pass-through, a validation that raises, disable."""

from __future__ import annotations

import copy

import pytest
import torch

import shims
from shims.patch import Skip
from shims.patches import yolo as yolo_patch
from tests.patches.yolo import yolov7_reference as ref
from tests.conftest import marker_line
from tests.patches.yolo.conftest import bitwise_equal, needs_cpu_half

SITE = "tests.patches.yolo.yolov7_reference:test"


@pytest.fixture
def half_path():
    """The CPU counts as an accelerator for the reference's `device.type != 'cpu'` check."""
    ref.ACCELERATOR.add("cpu")
    yield
    ref.ACCELERATOR.discard("cpu")


def trained_ema(seed=0):
    """A TinyDetector after a few SGD steps (non-trivial BatchNorm statistics), and a copy as its EMA."""
    torch.manual_seed(seed)
    model = ref.TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for img, targets in ref.batches(seed=seed + 1):
        optimizer.zero_grad()
        ref.tiny_loss(model(img.float() / 255), targets)[0].backward()
        optimizer.step()
    return copy.deepcopy(model)


def validate(function, ema):
    return function(None, model=ema, dataloader=ref.batches(), compute_loss=ref.tiny_loss)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def patched():
    receipt = shims.enable(patches=["yolo"], options={"SHIMS_YOLO_SITES": SITE})
    assert receipt["patches"]["yolo"]["targets"][SITE]["status"] == "applied"
    return ref.test  # the module attribute, now the patched function


@pytest.mark.usefixtures("half_path")
def test_patched_half_path_keeps_the_ema_and_equals_the_fixed_loop():
    fixed_ema, ema = trained_ema(), trained_ema()
    before = state(ema)
    expected = validate(ref.test_fixed, fixed_ema)
    got = validate(patched(), ema)
    assert got[0] == expected[0]
    assert all(torch.equal(a, b) for mine, theirs in zip(got[1], expected[1]) for a, b in zip(mine, theirs))
    assert bitwise_equal(state(ema), before) and all(p.requires_grad for p in ema.parameters())
    assert "half" not in ema.__dict__ and "forward" not in ema.__dict__  # nothing left on the model
    counters = shims.status()["patches"]["yolo"]["counters"]
    assert counters["validations_kept_float32"] == counters["model_half_prevented"] == 1
    assert counters["forwards_autocast"] == counters["losses_autocast"] == 3


@pytest.mark.usefixtures("half_path")
@needs_cpu_half()
def test_unpatched_half_path_rounds_the_ema_to_float16():
    ema = trained_ema()
    before = state(ema)
    validate(ref.test, ema)
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in before.items()}
    assert bitwise_equal(state(ema), rounded) and not bitwise_equal(state(ema), before)


def test_on_the_cpu_the_patched_validation_is_the_unpatched_one():
    plain_ema, ema = trained_ema(), trained_ema()
    expected = validate(ref.test, plain_ema)
    got = validate(patched(), ema)
    assert got[0] == expected[0] and bitwise_equal(state(ema), state(plain_ema))
    assert shims.status()["patches"]["yolo"]["counters"] == {"validations_passed_through": 1}


@pytest.mark.usefixtures("half_path")
def test_a_validation_that_raises_leaves_the_model_as_it_was():
    ema = trained_ema()
    before = state(ema)

    def broken_loss(train_out, targets):
        raise RuntimeError("loss failed")
    with pytest.raises(RuntimeError, match="loss failed"):
        patched()(None, model=ema, dataloader=ref.batches(), compute_loss=broken_loss)
    assert bitwise_equal(state(ema), before) and not {"half", "forward"} & set(ema.__dict__)


def test_disable_restores_the_function():
    original = ref.test
    patched()
    assert ref.test is not original and ref.test.__shims_original__ is original
    shims.disable()
    assert ref.test is original


def test_fingerprint_reads_the_half_calls():
    filename, halves = yolo_patch.read_half_calls(ref.test)
    assert filename == ref.__file__.replace(".pyc", ".py") and [text for _, text in halves] == ["model.half()"]

    def no_half(data, model=None):
        model.float()

    def no_model(data, net=None):
        net.half()
    with pytest.raises(Skip, match="nothing to fix") as benign:
        yolo_patch.read_half_calls(no_half)
    assert benign.value.status == "skipped-benign"
    with pytest.raises(Skip, match="no `model` parameter"):
        yolo_patch.read_half_calls(no_model)


def test_fixed_upstream_release_is_left_alone(monkeypatch):
    """ultralytics >= 8.4.62: the engine's version check says fixed-upstream before looking at the function."""
    from shims import versions
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda d: "8.4.62" if d == "ultralytics" else real(d))
    pytest.importorskip("ultralytics.engine.validator", reason="ultralytics is not installed here, or keeps its "
                        "validator in ultralytics.yolo.engine (early 8.0 releases)")
    receipt = shims.enable(patches=["yolo"])
    target = receipt["patches"]["yolo"]["targets"]["ultralytics.engine.validator:BaseValidator.__call__"]
    assert target["status"] == "fixed-upstream"


@pytest.mark.usefixtures("half_path")
@needs_cpu_half()
def test_detect_mode_reports_each_validation_at_the_caller_and_the_framework_line():
    """Observe only: the EMA still comes out float16-rounded (nothing changed); one finding per validation, placed at
    the line that called the validator (train.py's line in a clone), naming the `.half()` line; the generic half
    detector leaves this cast to the patch."""
    ema = trained_ema()
    before = state(ema)
    shims.enable(patches=["yolo"], mode="detect", options={"SHIMS_YOLO_SITES": SITE})
    try:
        for _ in range(2):
            ref.test(None, model=ema, dataloader=ref.batches(), compute_loss=ref.tiny_loss)  # validator call
    finally:
        shims.disable()
    patches = shims.status()["patches"]
    findings = patches["yolo"]["findings"]
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == [
        ("yolo-eval-half", marker_line(__file__, "validator call"), 2)]
    assert f"{ref.__file__}:{yolo_patch.read_half_calls(ref.test)[1][0][0]}" in findings[0]["message"]
    assert "the model passed for validation" in findings[0]["message"]
    assert not [f for f in patches.get("detect", {}).get("findings", []) if f["kind"] == "half-eval"]
    assert not bitwise_equal(state(ema), before)  # the run itself is unchanged: the cast happened


@pytest.mark.usefixtures("half_path")
def test_an_ema_made_of_inference_tensors_is_kept_too():
    """An unpatched validation under inference_mode (ultralytics', YOLOv5's) leaves the EMA made of inference tensors
    (its .half() / .float() ran there), which have no version counter: the next, patched, validation still keeps it."""
    ema = trained_ema()
    with torch.inference_mode():
        ema.double().float()
    assert next(ema.parameters()).is_inference()
    before = state(ema)
    validate(patched(), ema)
    assert bitwise_equal(state(ema), before)
    counters = shims.status()["patches"]["yolo"]["counters"]
    assert counters["validations_kept_float32"] == 1 and "validations_unconverted" not in counters
