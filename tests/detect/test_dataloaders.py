"""dataloader-workers and dataloader-pin-memory (shims/detect/detectors/dataloaders.py), CPU tensors standing in
for accelerator tensors."""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from shims.detect.detectors import dataloaders
from tests.detect.conftest import by_kind, line_of, observe


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


def test_dataloader_without_workers_or_pinning_is_found(tensors_count_as_on_an_accelerator, monkeypatch):
    # whether the measured wait is worth reporting is a comparison of two timings: taken out of the pass/fail here
    # (any wait counts), and checked on its own below
    monkeypatch.setattr(dataloaders, "LOADER_WAIT_SHARE", 0.0)

    def run():
        loader = torch.utils.data.DataLoader(SlowDataset(), batch_size=2)  # plain loader
        train_from(loader)
    findings = observe(run)
    assert sorted((f["kind"], f["where"], f["count"]) for f in findings) == [
        ("dataloader-pin-memory", line_of("plain loader"), 8),
        ("dataloader-workers", line_of("plain loader"), 8)]
    workers = by_kind(findings)[("dataloader-workers", line_of("plain loader"))]
    assert "waiting for each batch (measured)" in workers["cost"]


def test_a_wait_below_the_reporting_share_is_not_a_workers_finding(tensors_count_as_on_an_accelerator, monkeypatch):
    monkeypatch.setattr(dataloaders, "LOADER_WAIT_SHARE", math.inf)  # no wait reaches it: only the pinning is left

    def run():
        train_from(torch.utils.data.DataLoader(SlowDataset(), batch_size=2))  # quick enough
    assert [(f["kind"], f["where"]) for f in observe(run)] == [("dataloader-pin-memory", line_of("quick enough"))]


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
