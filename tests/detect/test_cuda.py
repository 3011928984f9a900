"""Host synchronisations and DataLoader settings on a real accelerator (CUDA). They only exist there: on the CPU
machine of CI these tests are skipped, and tests/detect/test_host_sync.py and test_dataloaders.py checks the same logic with CPU tensors standing in."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.detect.conftest import line_of, observe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: host syncs and pinned memory exist only on an accelerator")
SELF = __file__


class SlowDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        time.sleep(0.003)
        return torch.full((64,), float(index)), torch.tensor(float(index % 2))


def train(loader, read_every_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    total = torch.zeros((), device="cuda")
    for x, y in loader:
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        optimizer.step()
        if read_every_step:
            print(f"loss {loss.item():.4f}")  # cuda read every step
        total += loss.detach()
    return total.item()


def test_cuda_reads_every_step_and_a_plain_loader_are_found():
    def run():
        train(torch.utils.data.DataLoader(SlowDataset(), batch_size=4), read_every_step=True)  # cuda plain loader
    findings = {(f["kind"], f["where"]): f for f in observe(run)}
    assert set(findings) == {("host-sync", line_of("cuda read every step")),
                             ("dataloader-workers", line_of("cuda plain loader")),
                             ("dataloader-pin-memory", line_of("cuda plain loader"))}
    assert findings[("host-sync", line_of("cuda read every step"))]["count"] == 8
    assert "blocked per call (measured)" in findings[("host-sync", line_of("cuda read every step"))]["cost"]


def test_cuda_loop_with_workers_pinning_and_one_read_has_no_findings():
    def run():
        loader = torch.utils.data.DataLoader(SlowDataset(), batch_size=4, num_workers=2, pin_memory=True)
        train(loader, read_every_step=False)
    assert observe(run) == []
