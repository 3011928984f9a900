"""The accelerator-only detectors together (each has its tests/detect/test_<detector>.py): float32 training without autocast on tensor cores,
float16 autocast without a GradScaler, the same host data copied to the device every epoch, optimizers without
foreach/fused.

No accelerator on the CI machine: the CPU tests let CPU tensors stand for accelerator tensors (the
`tensors_count_as_on_an_accelerator` fixture of tests/detect/conftest.py) and answer the device questions that only an
accelerator can (its tensor cores, its free memory, torch's optimizer default for it) through shims.detect.devices,
each stand-in saying which device it plays. The CUDA tests at the end check the real thing and skip without CUDA.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shims
from shims.detect import devices

from tests.detect.conftest import (adam_default, adam_for_loop, line_of, observe_with_the_clock, of_kind,
                                   require_the_step_clock, scalers, train_float32, train_with)


# ---------------------------------------------------------------- torches without an API these detectors use


def test_without_any_grad_scaler_the_detector_is_refused_with_the_reason(monkeypatch):
    """A torch with neither torch.amp.GradScaler nor a scale() of its own in torch.cuda.amp.GradScaler (none exists,
    but the refusal must name it rather than report nothing)."""
    if hasattr(torch, "amp"):
        monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", type("GradScaler", (), {}))
    shims.enable(patches="none", mode="detect")
    shims.disable()
    target = shims.status()["patches"]["detect"]["targets"]["torch:detectors.grad-scaler"]
    assert target["status"] == "skipped"
    assert "has no torch.amp.GradScaler and no torch.cuda.amp.GradScaler" in target["reason"]


def test_autocast_queries_of_torch_before_2_4():
    """torch < 2.4 has no torch.get_autocast_dtype: the per-device queries answer (is_autocast_cpu_enabled and
    get_autocast_cpu_dtype here, asked through a view of this torch without the newer query)."""
    if not hasattr(torch, "is_autocast_cpu_enabled"):
        pytest.skip(f"torch {torch.__version__} has no per-device autocast queries")
    old_torch = types.SimpleNamespace(__version__="2.3", is_autocast_cpu_enabled=torch.is_autocast_cpu_enabled,
                                      get_autocast_cpu_dtype=torch.get_autocast_cpu_dtype)
    with warnings.catch_warnings():  # newer torches deprecate the per-device queries
        warnings.simplefilter("ignore", DeprecationWarning)
        assert devices.autocast_dtype(old_torch, "cpu") is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert devices.autocast_dtype(old_torch, "cpu") == torch.bfloat16
            assert devices.autocast_dtype(torch, "cpu") == torch.bfloat16
    with pytest.raises(LookupError, match="no autocast query for xla"):
        devices.autocast_dtype(old_torch, "xla")


def test_a_device_whose_autocast_state_cannot_be_asked_is_noted_not_guessed(a100, monkeypatch, matmul_precision):
    torch.set_float32_matmul_precision("highest")

    def cannot_tell(torch, device_type):
        raise LookupError(f"torch {torch.__version__} has no autocast query for {device_type}")
    monkeypatch.setattr(devices, "autocast_dtype", cannot_tell)
    assert observe_with_the_clock(train_float32, steps=2) == []
    notes = shims.status()["patches"]["detect"]["notes"]
    assert any(note.startswith("float32-training:") and "cannot tell whether autocast is on for cpu" in note
               for note in notes)


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_optimizers_without_torchs_default_rule_or_step_pre_hooks(monkeypatch):
    """Without torch.optim.optimizer._default_to_fused_or_foreach, foreach=None is not judged (noted); without the
    global step pre-hook, step() is not timed (noted); foreach=False is still found."""
    from torch.optim import optimizer as optimizer_module
    monkeypatch.delattr(optimizer_module, "_default_to_fused_or_foreach", raising=False)
    monkeypatch.delattr(optimizer_module, "register_optimizer_step_pre_hook", raising=False)
    monkeypatch.setattr(devices, "fused_devices", lambda torch: ["cpu", "cuda"])
    assert of_kind(observe_with_the_clock(train_with, adam_default), "optimizer-for-loop") == []
    notes = shims.status()["patches"]["detect"]["notes"]
    assert any("no torch.optim.optimizer._default_to_fused_or_foreach" in note for note in notes)
    assert any("no register_optimizer_step_pre_hook" in note for note in notes)
    findings = observe_with_the_clock(train_with, adam_for_loop)
    assert of_kind(findings, "optimizer-for-loop") == [(line_of("for-loop Adam"), 3)]
    assert "(measured)" not in findings[0]["cost"] and findings[0]["cost"].startswith("estimated")


# ---------------------------------------------------------------- the mode itself


def test_detect_mode_changes_nothing_in_these_loops(a100, free_gib, matmul_precision):
    """Bitwise: the weights after a loop with all four mistakes are those of a plain run."""
    require_the_step_clock()
    torch.set_float32_matmul_precision("highest")

    def run():
        torch.manual_seed(0)
        dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
        for _ in range(3):
            for x, y in torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True):
                optimizer.zero_grad()
                F.mse_loss(model(x.to("cpu")), y.to("cpu")).backward()
                optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    plain = run()
    shims.enable(patches="none", mode="detect")
    try:
        observed = run()
    finally:
        shims.disable()
    assert all(torch.equal(a, b) for a, b in zip(plain, observed))
    kinds = {f["kind"] for f in shims.status()["patches"]["detect"]["findings"]}
    assert {"float32-no-autocast", "data-copied-every-epoch", "optimizer-for-loop"} <= kinds


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_the_detectors_are_reverted_completely():
    from torch.utils.data import dataloader
    watched = [(torch.Tensor, "to"), (torch.Tensor, "cuda"), (torch.autograd, "backward"),
               (torch.optim.Optimizer, "__init__"), (dataloader.DataLoader, "__iter__")]
    watched += [(cls, "scale") for cls in scalers() if "scale" in cls.__dict__]
    before = {key: key[0].__dict__.get(key[1]) for key in watched}
    shims.enable(patches="none", mode="detect")
    assert all(key[0].__dict__.get(key[1]) is not before[key] for key in watched)
    shims.disable()
    assert all(key[0].__dict__.get(key[1]) is before[key] for key in watched)


# ---------------------------------------------------------------- on a real CUDA device

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device here: tensor cores, GradScaler, device memory and fused optimizers "
                                 "exist only on an accelerator (the CPU tests above check the same logic)")


def cuda_training(autocast=None, scaler=None, optimizer="sgd", epochs=3):
    torch.manual_seed(0)
    x_host, y_host = torch.randn(256, 64), torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).cuda()
    cls, options = {"sgd": (torch.optim.SGD, {"lr": 0.01}), "adam": (torch.optim.Adam, {"lr": 1e-3}),
                    "adam-for-loop": (torch.optim.Adam, {"lr": 1e-3, "foreach": False})}[optimizer]
    opt = cls(model.parameters(), **options)  # cuda optimizer
    for _ in range(epochs):
        x, y = x_host.cuda(), y_host.cuda()  # cuda full-batch copy
        opt.zero_grad()
        with torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None):
            loss = F.mse_loss(model(x).float(), y)  # cuda forward
        if scaler is None:
            loss.backward()  # cuda backward
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    torch.cuda.synchronize()


@cuda
def test_cuda_float32_training_copies_and_for_loop_optimizer_are_found(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    findings = observe_with_the_clock(cuda_training, optimizer="adam-for-loop")
    assert of_kind(findings, "data-copied-every-epoch") == [(line_of("cuda full-batch copy"), 3)]
    assert of_kind(findings, "optimizer-for-loop") == [(line_of("cuda optimizer"), 3)]
    assert "fused=True" in [f for f in findings if f["kind"] == "optimizer-for-loop"][0]["fix"]
    if torch.cuda.get_device_capability() >= (7, 0):
        assert of_kind(findings, "float32-no-autocast") == [(line_of("cuda forward"), 3)]
    assert of_kind(findings, "float16-no-grad-scaler") == []


@cuda
def test_cuda_float16_autocast_without_scaler_is_found():
    findings = observe_with_the_clock(cuda_training, autocast=torch.float16)
    assert of_kind(findings, "float16-no-grad-scaler") == [(line_of("cuda backward"), 3)]
    assert of_kind(findings, "float32-no-autocast") == []


@cuda
@pytest.mark.parametrize("scaler_class", scalers(), ids=lambda cls: cls.__module__)
def test_cuda_mixed_precision_with_scaler_and_default_adam_is_silent_for_these_detectors(matmul_precision,
                                                                                        scaler_class):
    torch.set_float32_matmul_precision("highest")
    with warnings.catch_warnings():  # torch.cuda.amp.GradScaler is deprecated in newer torches
        warnings.simplefilter("ignore")
        scaler = scaler_class()  # torch.amp.GradScaler defaults to "cuda"
    findings = observe_with_the_clock(cuda_training, autocast=torch.float16, scaler=scaler, optimizer="adam")
    assert {f["kind"] for f in findings} <= {"data-copied-every-epoch"}  # the copies are still there, on purpose


@cuda
def test_cuda_tf32_silences_float32_training(matmul_precision):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability >= 8.0")
    torch.set_float32_matmul_precision("high")
    assert of_kind(observe_with_the_clock(cuda_training), "float32-no-autocast") == []
