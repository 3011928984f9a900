"""The generic detectors of the observe-only mode (shims.detect), in-process, on small loops written here.

Each detector must fire on a minimal loop that has the mistake, at the user's line, with the right count, and stay
silent on the upstream-fixed reference loops (a false positive is a failure). Loops follow the structure of the
upstream code they stand for (doctr's fit_one_epoch, DETR-style evaluate, a VQGAN adaptive weight), in our words.
"""

from __future__ import annotations

import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shims
from tests.conftest import marker_line
from shims import detect
from shims.detect import tensors
from shims.detect.detectors import forwards

SELF = __file__


def line_of(marker):
    return marker_line(SELF, marker)


def observe(loop, *args, **kwargs):
    """Run `loop` in detect mode (generic detectors only), revert, and return the detectors' findings."""
    shims.enable(patches="none", mode="detect")
    try:
        loop(*args, **kwargs)
    finally:
        shims.disable()
    return shims.status()["patches"]["detect"]["findings"]


def by_kind(findings):
    return {(f["kind"], f["where"]): f for f in findings}


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


# ---------------------------------------------------------------- 1. unused-forward


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


def fit_one_epoch_fixed(model, train_loader, batch_transforms, optimizer, scheduler):
    """The same loop after doctr PR #1862 (commit 183cf65a52): one forward per step."""
    model.train()
    epoch_loss = 0.0
    for images, targets in train_loader:
        images = batch_transforms(images)
        optimizer.zero_grad()
        train_loss = model(images, targets)["loss"]
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
        scheduler.step()
        epoch_loss += train_loss.item()
    return epoch_loss / len(train_loader), scheduler.get_last_lr()[0]


def test_unused_forward_is_found_at_the_stray_line_once_per_step():
    model, loader, optimizer, scheduler = make_training(batches=4)
    findings = observe(fit_one_epoch_buggy, model, loader, batch_transforms, optimizer, scheduler)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("unused-forward", line_of("stray forward"), 4)]
    finding = findings[0]
    assert "TinyRecognizer" in finding["message"] and "2 forwards" in finding["message"]
    assert "measured forward time" in finding["cost"] and "median optimizer step" in finding["cost"]
    assert finding["fix"]


def fit_one_epoch_discarded(model, train_loader, batch_transforms, optimizer, scheduler):
    """A variant of the doctr mistake: the stray forward's result is dropped at once, and another module runs
    before the real forward (the duplicate is recognised by the shared input, whatever runs in between)."""
    model.train()
    for images, targets in train_loader:
        images = batch_transforms(images)
        model(images, targets)  # discarded forward
        nn.Identity()(images)
        optimizer.zero_grad()
        model(images, targets)["loss"].backward()
        optimizer.step()
        scheduler.step()


def test_unused_forward_whose_result_is_dropped_at_once_is_found():
    model, loader, optimizer, scheduler = make_training(batches=3)
    findings = observe(fit_one_epoch_discarded, model, loader, batch_transforms, optimizer, scheduler)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("unused-forward", line_of("discarded forward"), 3)]


def test_fixed_doctr_loop_has_no_findings():
    model, loader, optimizer, scheduler = make_training(batches=4)
    assert observe(fit_one_epoch_fixed, model, loader, batch_transforms, optimizer, scheduler) == []


def test_gradient_accumulation_has_no_findings():
    """Several forwards per optimizer step are fine when each is backpropagated."""
    model, loader, optimizer, _ = make_training(batches=4)

    def accumulate():
        model.train()
        for step, (images, targets) in enumerate(loader):
            loss = model(images, targets)["loss"] / 2
            loss.backward()
            if step % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
    assert observe(accumulate) == []


def test_frozen_batchnorm_finetuning_in_eval_mode_has_no_findings():
    """model.eval() during training (frozen BatchNorm statistics) is legitimate: its graphs reach backward."""
    model, loader, optimizer, _ = make_training(batches=3)

    def finetune():
        model.eval()
        for images, targets in loader:
            optimizer.zero_grad()
            model(images, targets)["loss"].backward()
            optimizer.step()
    assert observe(finetune) == []


def test_gan_style_detached_forward_has_no_findings():
    """A generator's output used detached by the discriminator step, then backpropagated by its own step."""
    torch.manual_seed(0)
    generator, discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), nn.Linear(4, 1)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.01)

    def train():
        for _ in range(3):
            fake = generator(torch.randn(8, 4))
            opt_d.zero_grad()
            d_loss = discriminator(fake.detach()).mean() - discriminator(torch.randn(8, 4)).mean()
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            (-discriminator(fake).mean()).backward()
            opt_g.step()
    assert observe(train) == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_has_no_findings(reentrant):
    """Checkpointing re-runs submodules inside backward; those forwards belong to autograd, not to the user."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=reentrant)

    torch.manual_seed(0)
    model = Checkpointed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train():
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(2, 4, requires_grad=reentrant)).sum().backward()
            optimizer.step()
    assert observe(train) == []


def test_lone_unused_forward_is_not_reported_as_duplicate():
    """A step that skips its backward (e.g. a non-finite loss) leaves one unused graph: not a duplicated forward."""
    model, loader, optimizer, _ = make_training(batches=3)

    def skip_first():
        model.train()
        for step, (images, targets) in enumerate(loader):
            optimizer.zero_grad()
            loss = model(images, targets)["loss"]
            if step == 0:
                continue
            loss.backward()
            optimizer.step()
    assert observe(skip_first) == []


# ---------------------------------------------------------------- 2. eval-with-grad


def evaluate_without_no_grad(model, loader, kept):
    model.eval()
    for images, targets in loader:
        out = model(images)  # eval forward
        kept.append(out["logits"].argmax(1))


def test_eval_with_grad_is_found_with_count_and_measured_memory():
    model, loader, _, _ = make_training(batches=3)
    findings = observe(evaluate_without_no_grad, model, loader, [])
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("eval-with-grad", line_of("eval forward"), 3)]
    assert "of activations saved for backward per call (measured" in findings[0]["cost"]
    assert "no_grad" in findings[0]["fix"]


def test_eval_outputs_kept_alive_until_exit_are_judged_at_the_end():
    """Outputs kept in a list (graphs alive to the end) are counted when the run ends (here: shims.disable())."""
    model, loader, _, _ = make_training(batches=3)
    kept = []

    def evaluate():
        model.eval()
        for images, _ in loader:
            kept.append(model(images)["logits"])  # kept eval output
    findings = observe(evaluate)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("eval-with-grad", line_of("kept eval output"), 3)]
    assert all(t.grad_fn is not None for t in kept)  # the graphs really were alive


@torch.no_grad()
def evaluate_decorated(model, loader):
    """DETR / Deformable-DETR / RT-DETR style: the whole evaluate function under @torch.no_grad()."""
    model.eval()
    return [model(images)["logits"] for images, _ in loader]


@pytest.mark.parametrize("style", ["no_grad", "inference_mode", "autocast", "decorated"])
def test_reference_evaluations_have_no_findings(style):
    model, loader, _, _ = make_training(batches=3)

    def evaluate():
        model.eval()
        if style == "decorated":
            evaluate_decorated(model, loader)
            return
        for images, _ in loader:
            if style == "no_grad":
                with torch.no_grad():
                    model(images)
            elif style == "inference_mode":
                with torch.inference_mode():
                    model(images)
            else:  # autocast without .half(), as the upstream answer to rf-detr #117 recommends
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    model(images)
    assert observe(evaluate) == []


# ---------------------------------------------------------------- 3. half-eval


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


def test_half_then_evaluation_is_found_at_the_cast():
    model = make_bn_mlp()

    def evaluate_fp16():
        model.eval()
        model.half()  # fp16 eval cast
        with torch.no_grad():
            model(torch.randn(3, 4).half())
    findings = observe(evaluate_fp16)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("half-eval", line_of("fp16 eval cast"), 1)]
    assert "Sequential.half()" in findings[0]["message"] and "training resumed" not in findings[0]["message"]
    assert "1 normalisation layer(s)" in findings[0]["cost"] and "eps 1e-05" in findings[0]["cost"]
    assert "autocast" in findings[0]["fix"]


def test_to_float16_then_evaluation_then_training_is_found():
    """The RF-DETR <= 1.5 shape: cast for evaluation, never cast back, training resumes in float16."""
    model = make_bn_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def evaluate_then_train():
        model.eval()
        model.to(torch.float16)  # to float16 cast
        with torch.no_grad():
            model(torch.randn(3, 4).half())
        model.train()
        model(torch.randn(3, 4).half()).float().sum().backward()  # training resumes
        optimizer.step()
    findings = observe(evaluate_then_train)
    assert [(f["kind"], f["where"]) for f in findings] == [("half-eval", line_of("to float16 cast"))]
    assert "Sequential.to(torch.float16)" in findings[0]["message"]
    assert f"training resumed with it still float16 (forward at {line_of('training resumes')})" in \
        findings[0]["message"]


@pytest.mark.parametrize("case", ["no_norm_layers", "cast_back", "autocast", "train_only"])
def test_half_reference_cases_have_no_findings(case):
    def run():
        if case == "no_norm_layers":
            torch.manual_seed(0)
            model = sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half().eval()
            with torch.no_grad():
                model(torch.randn(3, 4).half())
        elif case == "cast_back":
            model = make_bn_mlp().half()
            model.float().eval()
            with torch.no_grad():
                model(torch.randn(3, 4))
        elif case == "autocast":
            model = make_bn_mlp().eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=CPU_AUTOCAST_DTYPE):
                model(torch.randn(3, 4))
        else:  # deliberate float16 training, never evaluated: not this detector's business
            model = make_bn_mlp().half().train()
            model(torch.randn(3, 4).half()).float().sum().backward()
    assert observe(run) == []


# ---------------------------------------------------------------- 5. parameter hooks


class BucketReducer:
    """The old ColossalAI LowLevelZero shape (before PR #5596): a tensor hook per parameter queues its gradient."""

    def __init__(self, params, post_accumulate=False):
        self.queued = []
        self.accumulators = []  # torch 2.0: the gradient-accumulator nodes hooked (kept alive here)
        for param in params:
            if post_accumulate and hasattr(param, "register_post_accumulate_grad_hook"):
                param.register_post_accumulate_grad_hook(self.queue_accumulated)
            elif post_accumulate:  # torch 2.0 (no post-accumulate hook): the accumulator node, as DeepSpeed did
                accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
                accumulator.register_hook(lambda *_, param=param: self.queue_accumulated(param))
                self.accumulators.append(accumulator)
            else:
                param.register_hook(self.make_queue(param))  # reduction hook

    def make_queue(self, param):
        def queue(grad):
            self.queued.append(param)
            return grad
        return queue

    def queue_accumulated(self, param):
        self.queued.append(param)


class TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 3)
        self.decoder = nn.Linear(3, 6)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x)))


def adaptive_weight(nll_loss, g_loss, last_layer):
    """The taming-transformers VQGAN adaptive weight: two autograd.grad calls on the last layer (ColossalAI #5601)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grads.norm() / (g_grads.norm() + 1e-4)).clamp(0, 1e4).detach()


def vqgan_steps(post_accumulate, steps=3):
    torch.manual_seed(0)
    model = TinyAutoencoder()
    reducer = BucketReducer(model.parameters(), post_accumulate=post_accumulate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(4, 6)
        recon = model(x)
        nll_loss = (recon - x).abs().mean()
        g_loss = -recon.mean()
        weight = adaptive_weight(nll_loss, g_loss, model.decoder.weight)
        optimizer.zero_grad()
        (nll_loss + weight * g_loss).backward()
        optimizer.step()
    return reducer


def test_tensor_hook_fired_by_autograd_grad_is_found():
    reducers = []
    findings = observe(lambda: reducers.append(vqgan_steps(post_accumulate=False, steps=3)))
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("hook-in-autograd-grad", line_of("reduction hook"), 6)]  # 2 autograd.grad calls x 3 steps
    # the hook really ran for autograd.grad: 4 parameters per backward + 2 phantom entries per step
    assert len(reducers[0].queued) == 3 * (4 + 2)
    assert "register_post_accumulate_grad_hook" in findings[0]["fix"]


def test_post_accumulate_grad_hooks_have_no_findings():
    """The fixed shape (ColossalAI PR #5596): post-accumulate-grad hooks, which autograd.grad does not fire."""
    reducers = []
    assert observe(lambda: reducers.append(vqgan_steps(post_accumulate=True, steps=3))) == []
    assert len(reducers[0].queued) == 3 * 4


def test_tensor_hooks_with_plain_backward_have_no_findings():
    torch.manual_seed(0)
    model = TinyAutoencoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train():
        BucketReducer(model.parameters())
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            optimizer.step()
    assert observe(train) == []


def test_hook_registered_twice_fires_twice_per_backward():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    fired = []

    def train():
        for _ in range(2):  # e.g. an optimizer wrapper built twice over the same parameters
            layer.weight.register_hook(lambda g: fired.append(1))  # hook registered in a loop
        for _ in range(3):
            optimizer.zero_grad()
            layer(torch.randn(2, 3)).sum().backward()
            optimizer.step()
    findings = observe(train)
    assert len(fired) == 6
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("hook-fired-twice", line_of("hook registered in a loop"), 3)]


# ---------------------------------------------------------------- 6. host-sync and 7. DataLoader


@pytest.fixture
def tensors_count_as_on_an_accelerator(monkeypatch):
    """No accelerator on the CI machine: let CPU tensors stand for accelerator tensors, so the counting, the
    per-step rule and the call sites are exercised. (tests/test_detect_cuda.py checks the real thing on CUDA.)"""
    monkeypatch.setattr(tensors, "on_accelerator", lambda tensor: True)


def train_with_host_reads(steps=6):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    running = torch.zeros(())
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        running += loss.detach()
        if step % 5 == 4:
            print(f"loss {loss.item():.4f}")  # an occasional log line
        value = loss.item()  # a read every step
        if value > 1e9:  # what such a per-step read is typically for
            break
    return float(running)  # one read at the end


def test_host_reads_every_step_are_found(tensors_count_as_on_an_accelerator, capsys):
    findings = observe(train_with_host_reads, 6)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("host-sync", line_of("a read every step"), 6)]
    assert "in 6 of 6 optimizer steps" in findings[0]["message"]
    assert "blocked per call (measured)" in findings[0]["cost"]


def test_host_reads_of_cpu_tensors_are_not_syncs():
    assert observe(train_with_host_reads, 6) == []


class SlowDataset(torch.utils.data.Dataset):
    """Items that take a few milliseconds to load, like decoding images."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        time.sleep(0.003)
        return torch.full((4,), float(index)), torch.tensor(float(index % 2))


def train_from(loader):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in loader:
        optimizer.zero_grad()
        F.mse_loss(model(x).squeeze(1), y).backward()
        optimizer.step()


def test_dataloader_without_workers_or_pinning_is_found(tensors_count_as_on_an_accelerator):
    def run():
        loader = torch.utils.data.DataLoader(SlowDataset(), batch_size=2)  # plain loader
        train_from(loader)
    findings = observe(run)
    assert sorted((f["kind"], f["where"], f["count"]) for f in findings) == [
        ("dataloader-pin-memory", line_of("plain loader"), 8),
        ("dataloader-workers", line_of("plain loader"), 8)]
    workers = by_kind(findings)[("dataloader-workers", line_of("plain loader"))]
    assert "waiting for each batch (measured)" in workers["cost"]


def test_dataloader_with_workers_and_pinning_has_no_findings(tensors_count_as_on_an_accelerator):
    def run():
        train_from(torch.utils.data.DataLoader(SlowDataset(), batch_size=2, num_workers=1, pin_memory=True))
    with warnings.catch_warnings():  # no accelerator here: torch does not pin (recent torches warn about it)
        warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
        assert observe(run) == []


def test_dataloader_on_cpu_training_has_no_findings():
    def run():
        train_from(torch.utils.data.DataLoader(SlowDataset(), batch_size=2))
    assert observe(run) == []


# ---------------------------------------------------------------- the mode itself


def test_detectors_are_installed_and_reverted_completely():
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks
    from torch.utils.data import dataloader
    watched = [(nn.Module, "half"), (nn.Module, "to"), (torch.Tensor, "item"), (torch.Tensor, "__bool__"),
               (torch.Tensor, "__format__"), (torch.Tensor, "register_hook"), (torch.autograd, "grad"),
               (dataloader.DataLoader, "__init__"), (dataloader._BaseDataLoaderIter, "__next__")]
    before = {key: key[0].__dict__.get(key[1]) for key in watched}
    tables = [(module_hooks, "_global_forward_hooks"), (module_hooks, "_global_forward_pre_hooks"),
              (module_hooks, "_global_forward_hooks_with_kwargs"),  # with_kwargs / always_call: newer torches only
              (module_hooks, "_global_forward_hooks_always_called"), (optimizer_hooks, "_global_optimizer_post_hooks")]
    hook_dicts = [getattr(owner, name) for owner, name in tables if hasattr(owner, name)]
    hooks_before = [dict(d) for d in hook_dicts]
    receipt = shims.enable(patches="none", mode="detect")
    assert receipt["patches"]["detect"]["status"] == "applied"
    assert all(key[0].__dict__.get(key[1]) is not before[key] for key in watched)
    assert len(module_hooks._global_forward_hooks) == len(hooks_before[0]) + 1
    shims.disable()
    assert all(key[0].__dict__.get(key[1]) is before[key] for key in watched)
    assert [dict(d) for d in hook_dicts] == hooks_before  # every global hook table as it was
    assert shims.status()["patches"]["detect"]["status"] == "reverted"


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


@pytest.mark.usefixtures("optimizer_classes_restored")
def test_compiled_training_is_unchanged_and_quiet_in_detect_mode(recwarn):
    """torch.compile traces through modules with global hooks (ours skip themselves while compiling); torch's
    warning about global hooks concerns ours and is not shown; losses and weights are bitwise those of a plain run."""
    assert_compiled_training_unchanged_and_quiet(recwarn)


def test_fix_mode_installs_no_detectors():
    from torch.nn.modules import module as module_hooks
    shims.enable(patches="none", mode="fix")
    assert "detect" not in shims.status()["patches"]
    assert not module_hooks._global_forward_hooks


LWDETR_STYLE_EVALUATE = """
import torch


@torch.no_grad()
def evaluate(model, batches, args):
    model.eval()
    if args.fp16_eval:
        model.half()
    outputs = []
    for images in batches:
        if args.fp16_eval:
            images = images.half()
        outputs.append(model(images).float())
    return outputs
"""


def test_a_cast_that_a_patch_observes_itself_is_not_reported_twice(tmp_path, monkeypatch):
    """The detr patch observes LW-DETR-style evaluate functions (SHIMS_DETR_MODULES) and reports their
    `model.half()`; the generic half-eval check leaves a module where that check is applied to it, and still
    reports the very same code in a module no patch observes."""
    import importlib
    import types
    for name in ("shims_lwdetr_engine", "shims_other_engine"):
        (tmp_path / f"{name}.py").write_text(LWDETR_STYLE_EVALUATE)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    shims.enable(patches=["detr"], mode="detect", options={"SHIMS_DETR_MODULES": "shims_lwdetr_engine"})
    observed = importlib.import_module("shims_lwdetr_engine")
    other = importlib.import_module("shims_other_engine")
    assert shims.status()["patches"]["detr"]["targets"]["shims_lwdetr_engine:evaluate"]["status"] == "applied"
    args = types.SimpleNamespace(fp16_eval=True)
    observed.evaluate(make_bn_mlp(), [torch.randn(3, 4)], args)
    other.evaluate(make_bn_mlp(), [torch.randn(3, 4)], args)
    shims.disable()
    patches = shims.status()["patches"]
    assert len(patches["detr"]["findings"]) == 1  # the detr patch's own report of the observed module
    assert [(f["kind"], f["where"]) for f in patches["detect"]["findings"]] == \
        [("half-eval", f"{tmp_path / 'shims_other_engine.py'}:9")]


def test_a_failing_detector_never_breaks_training(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("detector bug")
    monkeypatch.setattr(forwards.Forwards, "forward_done", broken)
    model, loader, optimizer, scheduler = make_training(batches=3)
    shims.enable(patches="none", mode="detect")
    loss, _ = fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)
    record = shims.status()["patches"]["detect"]
    shims.disable()
    assert loss == loss  # training ran to the end and returned a number
    assert record["targets"]["torch:detectors.forwards"]["status"] == "error"
    assert any("detector bug" in note for note in record["notes"])


def test_a_failing_detector_raises_in_strict_mode(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("detector bug")
    monkeypatch.setattr(forwards.Forwards, "forward_done", broken)
    model, loader, optimizer, scheduler = make_training(batches=2)
    shims.enable(patches="none", mode="detect", strict=True)
    with pytest.raises(RuntimeError, match="detector bug"):
        fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)


def test_findings_have_exactly_the_documented_keys():
    model, loader, optimizer, scheduler = make_training(batches=2)
    findings = observe(fit_one_epoch_buggy, model, loader, batch_transforms, optimizer, scheduler)
    assert findings
    for finding in findings:
        assert set(finding) >= {"kind", "message", "where", "count", "cost", "fix", "per", "basis", "seconds_each",
                                "seconds_per_step", "step_share", "bytes"}
        assert set(finding) <= {"kind", "message", "where", "count", "cost", "fix", "per", "basis", "seconds_each",
                                "seconds_per_step", "step_share", "bytes", "seconds_once", "alternative",
                                "framework", "framework_version", "user_where"}
        assert finding["kind"] in detect.KINDS
        assert isinstance(finding["count"], int) and finding["count"] >= 1
        path, _, line = finding["where"].rpartition(":")
        assert path and line.isdigit()
