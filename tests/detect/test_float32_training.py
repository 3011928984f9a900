"""float32-no-autocast (shims/detect/detectors/float32_training.py): the CPU plays a tensor-core device."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from shims.detect import devices

from tests.detect.conftest import V100, line_of, observe_with_the_clock, of_kind, train_float32


# ---------------------------------------------------------------- float32-no-autocast


def test_float32_training_on_tensor_cores_is_found_once_per_step(a100, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    findings = observe_with_the_clock(train_float32, steps=3, micro_batches=2)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("float32-no-autocast", line_of("float32 forward"), 3)]  # counted per optimizer step, not per forward
    finding = findings[0]
    assert "Sequential" in finding["message"] and "matmuls" in finding["message"]
    assert finding["cost"].startswith("estimated: bfloat16 on the tensor cores peaks at about 16x")
    assert "A100 datasheet" in finding["cost"] and "(measured)" in finding["cost"]
    assert "torch.autocast(\"cpu\", dtype=torch.bfloat16)" in finding["fix"]
    assert "set_float32_matmul_precision(\"high\")" in finding["fix"]


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_float32_training_on_a_float16_only_device_names_the_grad_scaler(monkeypatch, matmul_precision):
    """Compute capability 7.x has float16 tensor cores and no TF32: setting TF32 does not silence it."""
    monkeypatch.setattr(devices, "tensor_cores", lambda torch, device: V100)
    torch.set_float32_matmul_precision("high")
    findings = observe_with_the_clock(train_float32, steps=2)
    assert of_kind(findings, "float32-no-autocast") == [(line_of("float32 forward"), 2)]
    assert "dtype=torch.float16) with a GradScaler" in findings[0]["fix"]
    assert "set_float32_matmul_precision" not in findings[0]["fix"]


def test_functional_matmuls_are_seen_in_the_graph(a100, matmul_precision):
    """A model without nn.Linear that multiplies by its own weight matrices: found from its autograd graph."""
    torch.set_float32_matmul_precision("highest")

    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.weight

    model = Bilinear()
    assert of_kind(observe_with_the_clock(train_float32, steps=2, model=model), "float32-no-autocast") == \
        [(line_of("float32 forward"), 2)]


class ToFloat32(nn.Module):
    def forward(self, x):
        return x.float()


@pytest.mark.parametrize("case", ["autocast", "autocast, float32 outputs", "tf32", "bfloat16 weights", "no matmul",
                                  "no optimizer step"])
def test_float32_training_stays_silent_where_the_tensor_cores_are_used(a100, matmul_precision, case):
    torch.set_float32_matmul_precision("highest")
    if case == "autocast":
        run = lambda: train_float32(autocast=torch.bfloat16)  # noqa: E731
    elif case == "autocast, float32 outputs":  # only the autocast state tells: the model returns float32
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), ToFloat32())
        run = lambda: train_float32(autocast=torch.bfloat16, model=model)  # noqa: E731
    elif case == "tf32":
        torch.set_float32_matmul_precision("high")
        run = train_float32
    elif case == "bfloat16 weights":
        run = lambda: train_float32(model=nn.Sequential(nn.Linear(8, 1)).to(torch.bfloat16))  # noqa: E731
    elif case == "no matmul":  # nothing a tensor core runs: elementwise work only
        run = lambda: train_float32(model=nn.Sequential(nn.LayerNorm(8)))  # noqa: E731
    else:
        def run():
            model = nn.Linear(8, 1)
            model(torch.randn(4, 8)).sum().backward()
    assert of_kind(observe_with_the_clock(run), "float32-no-autocast") == []


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_float32_training_on_the_cpu_is_silent(matmul_precision):
    """The real tensor_cores answers for the CPU (no tensor cores), even when its tensors count as an accelerator's;
    and without the stand-in the CPU is not an accelerator at all."""
    torch.set_float32_matmul_precision("highest")
    assert of_kind(observe_with_the_clock(train_float32), "float32-no-autocast") == []


def test_float32_training_without_an_accelerator_is_silent(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert observe_with_the_clock(train_float32) == []


def fake_cuda(capability, hip=None):
    return types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_capability=lambda device: capability,
                                                            is_bf16_supported=lambda: True),
                                 version=types.SimpleNamespace(hip=hip))


@pytest.mark.parametrize("capability, low, tf32, ratio", [((6, 1), None, None, None), ((7, 0), "float16", False, 8),
                                                          ((7, 5), "float16", False, 8), ((8, 0), "bfloat16", True, 16),
                                                          ((8, 6), "bfloat16", True, 4), ((8, 9), "bfloat16", True, 4),
                                                          ((9, 0), "bfloat16", True, 15), ((12, 0), "bfloat16", True,
                                                                                             None)])
def test_tensor_cores_by_compute_capability(capability, low, tf32, ratio):
    cores = devices.tensor_cores(fake_cuda(capability), torch.device("cuda", 0))
    if low is None:
        assert cores is None
    else:
        assert (cores.low, cores.tf32, cores.ratio) == (low, tf32, ratio)
        assert f"compute capability {capability[0]}.{capability[1]}" in cores.name
    assert devices.tensor_cores(torch, torch.device("cpu")) is None


def fake_backends(matmul=None, generic=None, legacy="highest", allow_tf32=False):
    """A torch whose TF32 settings are given: torch 2.9+'s fp32_precision (matmul, generic), the legacy precision
    (raising, as torch 2.9+ does once the two kinds of settings were mixed)."""
    def precision():
        if legacy == "mixed":
            raise RuntimeError("you have used mix of the legacy and new APIs to set the matmul precision")
        return legacy
    matmul_backend = types.SimpleNamespace(allow_tf32=allow_tf32)
    if matmul is not None:
        matmul_backend.fp32_precision = matmul
    backends = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=matmul_backend))
    if generic is not None:
        backends.fp32_precision = generic
    return types.SimpleNamespace(backends=backends, get_float32_matmul_precision=precision)


@pytest.mark.parametrize("settings, tf32", [({}, False), ({"legacy": "high"}, True), ({"legacy": "medium"}, True),
                                            ({"allow_tf32": True}, True), ({"matmul": "tf32"}, True),
                                            ({"matmul": "ieee", "legacy": "high"}, False),
                                            ({"matmul": "none", "generic": "tf32"}, True),
                                            ({"matmul": "none", "generic": "none", "legacy": "mixed"}, True)])
def test_tf32_is_read_from_the_legacy_and_the_new_settings(settings, tf32):
    """Both the settings of torch 2.0-2.8 and torch 2.9+'s fp32_precision; where torch cannot tell (mixed settings
    raise), TF32 counts as on: no finding rather than a wrong one."""
    assert devices.matmul_tf32(fake_backends(**settings)) is tf32
