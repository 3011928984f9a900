"""The generic unused-forward detector on a real doctr model (python-doctr 0.11.0, vitstr_small, pretrained=False).

The loop is doctr's recognition fit_one_epoch (references/recognition/train_pytorch.py <= v0.11.0) in our words,
buggy (the stray forward of doctr #1861) and fixed (PR #1862). Detect mode must count the stray forward once per
step at its line, stay silent on the fixed loop, and leave the training bitwise identical to a run without shims.
"""

from __future__ import annotations

import os

import pytest
import torch

import shims
from tests.detect.conftest import line_of

SELF = __file__
VOCAB = "abcdefghij"


def build():
    os.environ.setdefault("USE_TORCH", "1")
    recognition = pytest.importorskip("doctr.models.recognition", reason="python-doctr is not installed")
    torch.manual_seed(0)
    model = recognition.vitstr_small(pretrained=False, vocab=VOCAB)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 32, 128, generator=generator), ["abc", "jj"]) for _ in range(2)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=10)
    return model, batches, optimizer, scheduler


def fit_one_epoch(model, train_loader, optimizer, scheduler, fixed):
    model.train()
    epoch_loss = 0.0
    for images, targets in train_loader:
        if not fixed:
            train_loss = model(images, targets)["loss"]  # doctr stray forward
        optimizer.zero_grad()
        train_loss = model(images, targets)["loss"]
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
        scheduler.step()
        epoch_loss += train_loss.item()
    return epoch_loss / len(train_loader)


def train(fixed, detect):
    model, batches, optimizer, scheduler = build()
    if detect:
        shims.enable(patches="none", mode="detect")
    try:
        loss = fit_one_epoch(model, batches, optimizer, scheduler, fixed)
    finally:
        if detect:
            shims.disable()
    findings = shims.status()["patches"].get("detect", {}).get("findings", [])
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}, findings


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: steadier on a shared 2-core machine (the comparison is bitwise either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_real_doctr_stray_forward_is_found_and_training_is_unchanged():
    loss_plain, weights_plain, _ = train(fixed=False, detect=False)
    loss_detect, weights_detect, findings = train(fixed=False, detect=True)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("unused-forward", line_of("doctr stray forward"), 2)]
    assert "ViTSTR" in findings[0]["message"]
    assert loss_detect == loss_plain
    assert all(torch.equal(weights_plain[k], weights_detect[k]) for k in weights_plain)


@pytest.mark.slow
def test_real_doctr_fixed_loop_has_no_findings():
    _, _, findings = train(fixed=True, detect=True)
    assert findings == []
