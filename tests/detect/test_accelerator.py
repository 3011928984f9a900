"""The accelerator-only detectors of the observe-only mode: float32 training without autocast on tensor cores,
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
from tests.detect.conftest import line_of, observe as observe_in_detect_mode

SELF = __file__
A100 = devices.Cores("compute capability 8.0", "bfloat16", True, 16, 8, "A100 datasheet: 312 / 156 / 19.5 TFLOPS")
V100 = devices.Cores("compute capability 7.0", "float16", False, 8, None, "V100 datasheet: 125 / - / 15.7 TFLOPS")


def require_the_step_clock():
    """The loops below count on detect mode's optimizer-step clock. On torch 2.0-2.2 a torch.compile earlier in the
    process strips the step hooks of every torch.optim class (TorchPatcher); shims puts a step clock back
    (shims/detect/steps_after_compile.py, tested in tests/detect/test_steps_after_compile.py). Should the clock count
    nothing all the same, these tests skip, saying why, rather than pass on silence."""
    from shims import detect
    shims.enable(patches="none", mode="detect")
    try:
        param = nn.Parameter(torch.zeros(1))
        param.grad = torch.zeros(1)
        torch.optim.SGD([param], lr=0.1).step()
        counted = detect._CURRENT.steps
    finally:
        from shims import engine
        engine.reset()  # the probe's own observations must not reach the test's receipt
    if not counted:
        pytest.skip(f"torch {torch.__version__}: detect mode's step clock counted no optimizer step in this process")


def observe_with_the_clock(loop, *args, **kwargs):
    require_the_step_clock()
    return observe_in_detect_mode(loop, *args, **kwargs)


def of_kind(findings, kind):
    return [(f["where"], f["count"]) for f in findings if f["kind"] == kind]


@pytest.fixture
def a100(monkeypatch, request):
    """The CPU plays an A100: tensor cores with bfloat16 and TF32."""
    request.getfixturevalue("tensors_count_as_on_an_accelerator")
    monkeypatch.setattr(devices, "tensor_cores", lambda torch, device: A100)


@pytest.fixture
def matmul_precision():
    """Whatever a test sets with torch.set_float32_matmul_precision is undone after it."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def cpu_autocast_runs(dtype):
    """Whether autocast on the CPU really computes a Linear in `dtype` here (float16: torch >= 2.3 or so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=dtype):
                return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == dtype
        except RuntimeError:
            return False


# ---------------------------------------------------------------- float32-no-autocast


def train_float32(steps=3, micro_batches=1, autocast=None, model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(micro_batches):
            x = torch.randn(4, 8, dtype=next(model.parameters()).dtype)
            if autocast is None:
                out = model(x)  # float32 forward
            else:
                with torch.autocast("cpu", dtype=autocast):
                    out = model(x)  # forward under autocast
            out.float().pow(2).mean().backward()
        optimizer.step()


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


# ---------------------------------------------------------------- float16-no-grad-scaler

needs_cpu_float16_autocast = pytest.mark.skipif(
    not cpu_autocast_runs(torch.float16),
    reason=f"torch {torch.__version__} has no float16 autocast on the CPU (the stand-in for an accelerator here)")


def scalers():
    """The GradScaler classes this torch has (torch.amp's from 2.3, torch.cuda.amp's always), feature-detected."""
    found = [getattr(getattr(torch, "amp", None), "GradScaler", None), torch.cuda.amp.GradScaler]
    return [cls for cls in found if cls is not None]


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


# ---------------------------------------------------------------- data-copied-every-epoch

GIB = 1024 ** 3


@pytest.fixture
def free_gib(monkeypatch, request):
    """The CPU plays a device with 1 GiB free."""
    request.getfixturevalue("tensors_count_as_on_an_accelerator")
    monkeypatch.setattr(devices, "free_memory", lambda torch, device: GIB)


def full_batch_training(epochs=3, change=False):
    """PINN-style full-batch training: the whole data set is one host tensor, copied to the device every epoch."""
    torch.manual_seed(0)
    device = torch.device("cpu")  # the accelerator, in the stand-in
    x_host, y_host = torch.randn(64, 8), torch.randn(64, 1)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        if change:
            x_host.add_(0.01)  # the data changes between epochs (an in-place augmentation)
            y_host.mul_(0.99)
        x, y = x_host.to(device), y_host.to(device)  # full-batch copy
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def test_the_same_host_tensors_copied_every_epoch_are_found(free_gib):
    findings = observe_with_the_clock(full_batch_training, epochs=3)
    assert of_kind(findings, "data-copied-every-epoch") == [(line_of("full-batch copy"), 3)]
    finding = findings[0]
    assert "the same host tensors" in finding["message"] and "2.2 KiB per round" in finding["message"]
    assert "1.0 GiB free" in finding["message"]
    assert "(measured host time" in finding["cost"] and "estimated" in finding["cost"] and "GB/s" in finding["cost"]
    assert "once" in finding["fix"]


def test_a_sparse_copy_does_not_switch_the_detector_off(free_gib):
    """Sparse tensors have no data_ptr: their copies are left out, and the detector keeps working."""
    def run():
        torch.eye(3).to_sparse().to("cpu")
        full_batch_training(epochs=3)
    assert of_kind(observe_with_the_clock(run), "data-copied-every-epoch") == [(line_of("full-batch copy"), 3)]
    assert not shims.status()["patches"]["detect"]["notes"] or \
        not any("device-copies" in note for note in shims.status()["patches"]["detect"]["notes"])


def sliced_epochs(epochs=3, batch=16):
    torch.manual_seed(0)
    x_all = torch.randn(64, 8)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for start in range(0, 64, batch):
            x = x_all[start:start + batch].to("cpu")  # slices of one host tensor
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()


def test_slices_of_one_host_tensor_copied_every_epoch_are_found(free_gib):
    findings = observe_with_the_clock(sliced_epochs, epochs=3)
    assert of_kind(findings, "data-copied-every-epoch") == [(line_of("slices of one host tensor"), 3)]
    assert "2.0 KiB per round" in findings[0]["message"]


def tensor_dataset_epochs(epochs=3, rebuild_loader=False):
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        if rebuild_loader:
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        for x, y in loader:  # iterate the TensorDataset
            x, y = x.to("cpu"), y.to("cpu")  # batch copies
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()


@pytest.mark.parametrize("rebuild_loader", [False, True])
def test_a_tensor_dataset_loader_copied_every_epoch_is_found(free_gib, rebuild_loader):
    findings = [f for f in observe_with_the_clock(tensor_dataset_epochs, epochs=3, rebuild_loader=rebuild_loader)
                if f["kind"] == "data-copied-every-epoch"]  # (its DataLoader without workers is found too)
    assert [(f["where"], f["count"]) for f in findings] == [(line_of("batch copies"), 3)]
    message = findings[0]["message"]
    assert f"TensorDataset of host tensors iterated at {line_of('iterate the TensorDataset')}" in message
    assert "1.1 KiB per round" in message and "all of it (1.1 KiB)" in message
    assert "TensorDataset(x.to(device), y.to(device))" in findings[0]["fix"]


def fresh_batches(steps=6):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(16, 8).to("cpu")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def data_on_the_device_once(epochs=3):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8).to("cpu"), torch.randn(64, 1).to("cpu")
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("case", ["fresh batches", "changed in place", "moved once", "a plain DataLoader"])
def test_copies_of_new_data_are_silent(free_gib, case):
    if case == "fresh batches":
        run = fresh_batches
    elif case == "changed in place":
        run = lambda: full_batch_training(epochs=3, change=True)  # noqa: E731
    elif case == "moved once":
        run = data_on_the_device_once
    else:  # a Dataset whose items are made anew at each epoch: nothing to keep on the device
        class Fresh(torch.utils.data.Dataset):
            def __len__(self):
                return 16

            def __getitem__(self, index):
                return torch.randn(8), torch.randn(1)

        def run():
            for _ in range(3):
                for x, y in torch.utils.data.DataLoader(Fresh(), batch_size=4):
                    x.to("cpu"), y.to("cpu")
    assert of_kind(observe_with_the_clock(run), "data-copied-every-epoch") == []


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_data_that_would_not_fit_is_silent(monkeypatch):
    monkeypatch.setattr(devices, "free_memory", lambda torch, device: 4096)  # 2.2 KiB is over half of it
    assert of_kind(observe_with_the_clock(full_batch_training, epochs=3), "data-copied-every-epoch") == []


def test_copies_on_the_cpu_are_silent():
    assert observe_with_the_clock(full_batch_training, epochs=3) == []
    assert observe_with_the_clock(tensor_dataset_epochs, epochs=3) == []


# ---------------------------------------------------------------- optimizer-for-loop


def train_with(make_optimizer, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = make_optimizer(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()


def adam_for_loop(params):
    return torch.optim.Adam(params, lr=1e-3, foreach=False)  # for-loop Adam


def sgd_for_loop(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False)  # for-loop SGD


def adam_default(params):
    return torch.optim.AdamW(params, lr=1e-3)  # default AdamW


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
