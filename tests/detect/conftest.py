"""Helpers shared by the detect tests (import them as `from tests.detect.conftest import ...`).

    line_with(path, text)   file:line of the one line of `path` that contains `text`
    observe(loop, ...)      run `loop` in detect mode (generic detectors only), revert, return the receipt's findings
    by_kind(findings)       {(kind, where): finding}
    chromium()              the headless Chromium binary (pytest.skip, saying why, where there is none)
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shims
from shims.detect import devices, tensors
from tests.conftest import marker_line

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                    "detect_demo.py")
FIXED_DEMO = os.path.join(os.path.dirname(DEMO), "detect_demo_fixed.py")
SARIF_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sarif-schema-2.1.0.json")


def line_of(marker, path=None):
    """`file:N` of the line carrying `# marker`: in `path`, else in the calling test file, else in this file (the
    loops shared by the detect tests live here)."""
    if path is None:
        caller = sys._getframe(1).f_code.co_filename
        with open(caller) as f:
            path = caller if f"# {marker}" in f.read() else __file__
    return marker_line(path, marker)


def line_with(path, text):
    """file:line of the single line of `path` containing `text`."""
    with open(path) as f:
        hits = [n for n, line in enumerate(f, 1) if text in line]
    assert len(hits) == 1, f"{text!r} is on {len(hits)} lines of {path}"
    return f"{path}:{hits[0]}"


def observe(loop, *args, **kwargs):
    """Run `loop` in detect mode (generic detectors only), revert, and return the detectors' findings (dicts)."""
    shims.enable(patches="none", mode="detect")
    try:
        loop(*args, **kwargs)
    finally:
        shims.disable()
    return shims.status()["patches"]["detect"]["findings"]


def by_kind(findings):
    return {(f["kind"], f["where"]): f for f in findings}


def chromium():
    """The path of a headless Chromium (Debian's `chromium` package; scripts/setup.sh installs it), or skip."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on PATH (scripts/setup.sh installs Debian's `chromium` where apt-get is allowed; "
                "elsewhere: apt-get install -y chromium)")


# ---------------------------------------------------------------- loops and models shared by the detect tests

class TinyRecognizer(nn.Module):
    """doctr-style recognition model: model(images, targets) -> {"loss", "logits"}; BatchNorm and dropout, so that a
    second forward draws dropout masks and moves running statistics like doctr's models do."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d((1, 8)), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, classes))

    def forward(self, images, targets=None):
        logits = self.head(self.features(images))
        out = {"logits": logits}
        if targets is not None:
            out["loss"] = F.cross_entropy(logits, targets)
        return out


def make_training(seed=0, batches=4, batch_size=4):
    torch.manual_seed(seed)
    model = TinyRecognizer()
    images = torch.randn(batches * batch_size, 1, 8, 16)
    targets = torch.randint(0, 5, (batches * batch_size,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=batches * 4)
    return model, loader, optimizer, scheduler


def batch_transforms(images):
    return (images - 0.5) / 0.25


def fit_one_epoch_buggy(model, train_loader, batch_transforms, optimizer, scheduler):
    """doctr references/recognition/train_pytorch.py before PR #1862 (non-AMP branch): a stray first forward."""
    model.train()
    epoch_loss = 0.0
    for images, targets in train_loader:
        images = batch_transforms(images)
        train_loss = model(images, targets)["loss"]  # stray forward
        optimizer.zero_grad()
        train_loss = model(images, targets)["loss"]
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
        scheduler.step()
        epoch_loss += train_loss.item()
    return epoch_loss / len(train_loader), scheduler.get_last_lr()[0]


def _cpu_float16_kernels():
    """Whether this torch's CPU build has float16 matmul and batch norm (torch 2.0-2.2 have neither)."""
    try:
        with torch.no_grad():
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).half().eval()(torch.zeros(1, 2, dtype=torch.float16))
        return True
    except RuntimeError:
        return False


CPU_FLOAT16 = _cpu_float16_kernels()


def _cpu_autocast_dtype():
    """float16 where CPU autocast supports it, else bfloat16 (torch 2.0 CPU autocast is bfloat16 only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.0 warns before it raises
            with torch.autocast("cpu", dtype=torch.float16):
                pass
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


CPU_AUTOCAST_DTYPE = _cpu_autocast_dtype()


class Float16Sequential(nn.Sequential):
    """Where the CPU build has no float16 kernels, a float16 forward computed in float32 from the float16 weights:
    half-eval needs only what stays the same (float16 parameters, the eval-mode call of the cast module)."""

    def forward(self, x):
        if CPU_FLOAT16 or x.dtype != torch.float16:
            return super().forward(x)
        x = x.float()
        for layer in self:
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer.weight.float(), layer.bias.float())
            elif isinstance(layer, nn.BatchNorm1d):
                x = F.batch_norm(x, layer.running_mean.float(), layer.running_var.float(), layer.weight.float(),
                                 layer.bias.float(), layer.training, layer.momentum, layer.eps)
            else:
                x = layer(x)
        return x.half()


def sequential(*layers):
    return nn.Sequential(*layers) if CPU_FLOAT16 else Float16Sequential(*layers)


def make_bn_mlp():
    torch.manual_seed(0)
    return sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_compiled(detect):
    """Three steps of a small model under torch.compile, detect mode on or off: (losses, final weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    if detect:
        shims.enable(patches="none", mode="detect")
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = compiled(torch.randn(6, 4, generator=generator)).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if detect:
        shims.disable()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def assert_compiled_training_unchanged_and_quiet(recwarn):
    plain_losses, plain_weights = train_compiled(detect=False)
    detect_losses, detect_weights = train_compiled(detect=True)
    assert torch.equal(plain_losses, detect_losses)
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, detect_weights))
    assert not [w for w in recwarn if "global hooks" in str(w.message)]
    assert shims.status()["patches"]["detect"]["findings"] == []


@pytest.fixture
def tensors_count_as_on_an_accelerator(monkeypatch):
    """No accelerator on the CI machine: let CPU tensors stand for accelerator tensors, so the counting, the
    per-step rule and the call sites are exercised. (tests/detect/test_cuda.py checks the real thing on CUDA.)"""
    monkeypatch.setattr(tensors, "on_accelerator", lambda tensor: True)


# ---------------------------------------------------------------- stand-ins for an accelerator's answers

A100 = devices.Cores("compute capability 8.0", "bfloat16", True, 16, 8, "A100 datasheet: 312 / 156 / 19.5 TFLOPS")
V100 = devices.Cores("compute capability 7.0", "float16", False, 8, None, "V100 datasheet: 125 / - / 15.7 TFLOPS")


def require_the_step_clock():
    """The loops below count on detect mode's optimizer-step clock. On torch 2.0-2.2 a torch.compile earlier in the
    process strips the step hooks of every torch.optim class (TorchPatcher); shims puts a step clock back
    (shims/detect/steps_after_compile.py, tested in tests/detect/test_steps_after_compile.py). Should the clock count
    nothing all the same, that is a failure of shims, not of the test: it fails here, saying so, before any loop could
    pass on silence."""
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
    assert counted, f"torch {torch.__version__}: detect mode's step clock counted no optimizer step in this process"


def observe_with_the_clock(loop, *args, **kwargs):
    require_the_step_clock()
    return observe(loop, *args, **kwargs)


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



GIB = 1024 ** 3


@pytest.fixture
def free_gib(monkeypatch, request):
    """The CPU plays a device with 1 GiB free."""
    request.getfixturevalue("tensors_count_as_on_an_accelerator")
    monkeypatch.setattr(devices, "free_memory", lambda torch, device: GIB)


needs_cpu_float16_autocast = pytest.mark.skipif(
    not cpu_autocast_runs(torch.float16),
    reason=f"torch {torch.__version__} has no float16 autocast on the CPU (the stand-in for an accelerator here)")


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


def adam_default(params):
    return torch.optim.AdamW(params, lr=1e-3)  # default AdamW


def scalers():
    """The GradScaler classes this torch has (torch.amp's from 2.3, torch.cuda.amp's always), feature-detected."""
    found = [getattr(getattr(torch, "amp", None), "GradScaler", None), torch.cuda.amp.GradScaler]
    return [cls for cls in found if cls is not None]
