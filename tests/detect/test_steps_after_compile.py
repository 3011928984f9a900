"""The optimizer-step clock keeps counting after torch.compile (torch 2.0-2.2 unhook optimizer steps there).

torch 2.0-2.2's first torch.compile runs TorchPatcher.patch(), which strips the wrapper that calls the global
optimizer step hooks from every torch.optim class and marks their step so it is never wrapped again: detect mode's
per-step detectors would then see no step. This runs in a fresh interpreter (the patch runs once per process) on
whatever torch the suite runs with: on 2.0-2.2 shims re-hooks the steps, on newer torches nothing needs it; either way
steps after a compile are counted, and shims.disable() leaves torch's own step in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import SOURCE

SCRIPT = r"""
import json, torch
import shims
from torch import nn
shims.enable(mode="detect", patches="none")
from shims import detect

def train(steps):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()

train(2)
before = detect._CURRENT.steps
step_before_compile = torch.optim.SGD.__dict__["step"]
try:
    torch.compile(nn.Linear(2, 2), backend="eager")(torch.randn(1, 2))
    compiled = True
except Exception as exc:  # a torch.compile that cannot run here
    compiled = repr(exc)
train(3)
after = detect._CURRENT.steps
shims.disable()
print(json.dumps({"before": before, "after": after, "compiled": compiled,
                  "torch_step_back": getattr(torch.optim.SGD.__dict__["step"], "__shims_original__", None) is None}))
"""


def test_steps_after_torch_compile_are_counted():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (SOURCE, os.environ.get("PYTHONPATH")) if p])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if seen["compiled"] is not True:
        import pytest
        pytest.skip(f"torch.compile cannot run here: {seen['compiled']}")
    assert seen["before"] == 2 and seen["after"] == 5, seen
    assert seen["torch_step_back"], "shims.disable() left its step wrapper on torch.optim.SGD"
