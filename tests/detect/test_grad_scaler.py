"""float16-no-grad-scaler (shims/detect/detectors/grad_scaler.py): CPU tensors stand for accelerator tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import shims

from tests.detect.conftest import line_of, needs_cpu_float16_autocast, observe_with_the_clock, of_kind, scalers


# ---------------------------------------------------------------- float16-no-grad-scaler



def train_float16(steps=3, dtype=torch.float16, scaler=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = model(torch.randn(4, 8)).float().pow(2).mean()
        if scaler is None:
            loss.backward()  # unscaled backward
            optimizer.step()
        else:
            scaler.scale(loss).backward()  # scaled backward
            scaler.step(optimizer)
            scaler.update()


@needs_cpu_float16_autocast
@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_float16_autocast_without_grad_scaler_is_found_at_the_backward():
    findings = observe_with_the_clock(train_float16, steps=3)
    assert of_kind(findings, "float16-no-grad-scaler") == [(line_of("unscaled backward"), 3)]
    finding = [f for f in findings if f["kind"] == "float16-no-grad-scaler"][0]
    assert "autocast(dtype=torch.float16)" in finding["message"] and "forward at" in finding["message"]
    assert finding["cost"].startswith("estimated:") and "6e-8" in finding["cost"]
    assert "GradScaler" in finding["fix"] and "bfloat16" in finding["fix"]


@needs_cpu_float16_autocast
@pytest.mark.skipif(not hasattr(getattr(torch, "amp", None), "GradScaler"),
                    reason=f"torch {torch.__version__} has no torch.amp.GradScaler (its torch.cuda.amp.GradScaler does "
                           "not scale without CUDA)")
@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_float16_autocast_with_a_grad_scaler_is_silent():
    try:
        scaler = torch.amp.GradScaler("cpu")
        train_float16(steps=1, scaler=torch.amp.GradScaler("cpu"))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        pytest.skip(f"torch {torch.__version__} cannot scale gradients on the CPU: {exc}")
    assert of_kind(observe_with_the_clock(train_float16, steps=3, scaler=scaler), "float16-no-grad-scaler") == []


@needs_cpu_float16_autocast
@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_float16_autocast_with_a_disabled_grad_scaler_is_found():
    """GradScaler(enabled=False).scale returns the loss unscaled: nothing protects the float16 gradients."""
    with warnings.catch_warnings():  # torch.cuda.amp.GradScaler is deprecated in newer torches
        warnings.simplefilter("ignore")
        scaler = scalers()[0](enabled=False)
    findings = observe_with_the_clock(train_float16, steps=2, scaler=scaler)
    assert [where for where, _ in of_kind(findings, "float16-no-grad-scaler")] == [line_of("scaled backward")]


@pytest.mark.parametrize("scaler_class", scalers(), ids=lambda cls: cls.__module__)
def test_every_grad_scaler_class_of_this_torch_is_watched(scaler_class):
    """torch.amp.GradScaler (2.3+) and torch.cuda.amp.GradScaler (all): whichever defines scale() is wrapped, so an
    instance of either is seen scaling."""
    original = scaler_class.scale
    shims.enable(patches="none", mode="detect")
    try:
        assert scaler_class.scale is not original
        assert getattr(scaler_class.scale, "__shims_original__", None) is not None
    finally:
        shims.disable()
    assert scaler_class.scale is original


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_bfloat16_autocast_without_grad_scaler_is_silent():
    assert of_kind(observe_with_the_clock(train_float16, steps=3, dtype=torch.bfloat16), "float16-no-grad-scaler") == []


@needs_cpu_float16_autocast
def test_float16_autocast_on_the_cpu_is_silent():
    assert of_kind(observe_with_the_clock(train_float16, steps=3), "float16-no-grad-scaler") == []
