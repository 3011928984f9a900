"""host-sync (shims/detect/detectors/host_sync.py), CPU tensors standing in for accelerator tensors."""

from __future__ import annotations

import torch
from torch import nn

from tests.detect.conftest import line_of, observe


# ---------------------------------------------------------------- 6. host-sync and 7. DataLoader


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
