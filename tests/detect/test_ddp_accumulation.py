"""ddp-accumulation-sync: gradient accumulation under DistributedDataParallel without no_sync().

One gloo rank in-process (DDP's all-reduce runs, its communication time is measured); the fix the finding names is
followed: with no_sync() for all but the last micro-batch the finding is gone and the weights are bitwise those of
the loop as written (one rank: the accumulated sum is the same numbers in the same order).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shims
from shims import engine
from tests.conftest import marker_line
from tests.conftest import free_port

MICRO = 3
STEPS = 4


@pytest.fixture(scope="module")
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def train(use_no_sync):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for micro in range(MICRO):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
            if use_no_sync and micro < MICRO - 1:
                with model.no_sync():
                    nn.functional.cross_entropy(model(x), y).backward()  # micro-no-sync
            else:
                nn.functional.cross_entropy(model(x), y).backward()  # micro-synced
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def observe_accumulation(use_no_sync):
    engine.reset()  # each run reports its own findings
    shims.enable(patches="none", mode="detect")
    try:
        weights = train(use_no_sync)
    finally:
        shims.disable()
    findings = [f for f in shims.status()["patches"]["detect"]["findings"] if f["kind"] == "ddp-accumulation-sync"]
    return weights, findings


def test_accumulation_without_no_sync_is_found_with_count_cost_and_fix(one_rank):
    _, findings = observe_accumulation(use_no_sync=False)
    (finding,) = findings
    assert finding["where"] == marker_line(__file__, "micro-synced")
    assert finding["count"] == STEPS
    assert f"up to {MICRO} synchronised backward passes each ({STEPS * (MICRO - 1)} all-reduces" in finding["message"]
    assert "per step in the extra all-reduces (measured" in finding["cost"]
    assert "with model.no_sync():" in finding["fix"]


def test_the_fix_followed_is_silent_and_trains_the_same_weights(one_rank):
    as_written, _ = observe_accumulation(use_no_sync=False)
    followed, findings = observe_accumulation(use_no_sync=True)
    assert findings == []
    assert all(torch.equal(as_written[k], followed[k]) for k in as_written)
