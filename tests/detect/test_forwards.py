"""unused-forward and eval-with-grad (shims/detect/detectors/forwards.py) on small loops written here: each fires
on a minimal loop that has the mistake, at the user's line, with the right count, and stays silent on the
upstream-fixed reference loops (doctr's fit_one_epoch, DETR-style evaluate), written in our words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.detect.conftest import batch_transforms, fit_one_epoch_buggy, line_of, make_training, observe


# ---------------------------------------------------------------- 1. unused-forward


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
