"""optimizer-for-loop (shims/detect/detectors/optimizers.py): the CPU plays a CUDA device for torch's own rule."""

from __future__ import annotations

import pytest
import torch

from shims.detect import devices

from tests.detect.conftest import adam_default, adam_for_loop, line_of, observe_with_the_clock, of_kind, train_with


# ---------------------------------------------------------------- optimizer-for-loop


def sgd_for_loop(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False)  # for-loop SGD


@pytest.mark.parametrize("make, marker, name", [(adam_for_loop, "for-loop Adam", "Adam"),
                                                (sgd_for_loop, "for-loop SGD", "SGD")])
@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_an_optimizer_with_foreach_false_is_found_where_it_is_built(make, marker, name):
    findings = observe_with_the_clock(train_with, make, steps=3)
    assert of_kind(findings, "optimizer-for-loop") == [(line_of(marker), 3)]
    finding = findings[0]
    assert f"{name} built here updates 4 parameter tensors on cpu one at a time (foreach=False)" in finding["message"]
    from torch.optim import optimizer as optimizer_module
    if hasattr(optimizer_module, "register_optimizer_step_pre_hook"):
        assert "host time per step() (measured)" in finding["cost"]
    assert "estimated: about 32 kernel launches" in finding["cost"]
    assert "fused=True" in finding["fix"] or "foreach=True" in finding["fix"]


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_a_default_optimizer_is_found_where_torch_picks_the_for_loop_and_fused_exists(monkeypatch):
    """torch's own rule, asked for real: for CPU parameters it picks the for-loop; fused kernels are said to exist
    for the device the CPU plays."""
    monkeypatch.setattr(devices, "fused_devices", lambda torch: ["cpu", "cuda"])
    assert devices.default_implementation(torch, [torch.zeros(2)], False) == "for-loop"
    findings = observe_with_the_clock(train_with, adam_default, steps=2)
    assert of_kind(findings, "optimizer-for-loop") == [(line_of("default AdamW"), 2)]
    assert "torch's default, which picks the for-loop" in findings[0]["message"]
    assert "AdamW(..., fused=True)" in findings[0]["fix"]


def torch_picks_foreach(torch, params, differentiable):
    """The answer torch's rule gives for CUDA parameters (foreach), for the CPU standing in."""
    return "foreach"


@pytest.mark.parametrize("case", ["default where torch picks foreach", "foreach=True", "default, no fused kernels"])
@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_optimizers_that_are_not_for_loops_are_silent(monkeypatch, case):
    if case == "default where torch picks foreach":
        monkeypatch.setattr(devices, "default_implementation", torch_picks_foreach)
        make = adam_default
    elif case == "foreach=True":  # silent although fused kernels would exist for the device
        monkeypatch.setattr(devices, "fused_devices", lambda torch: ["cpu", "cuda"])
        make = lambda params: torch.optim.Adam(params, foreach=True)  # noqa: E731
    else:  # the for-loop is torch's only choice here: nothing better to name
        monkeypatch.setattr(devices, "fused_devices", lambda torch: ["cuda"])
        make = adam_default
    assert of_kind(observe_with_the_clock(train_with, make), "optimizer-for-loop") == []


def test_optimizers_on_the_cpu_are_silent():
    assert observe_with_the_clock(train_with, adam_for_loop) == []
