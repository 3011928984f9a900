"""ddp advice at Lightning 1.x's DDP and DDP-spawn strategies (find_unused_parameters=True by default before 2.0):
a user's script (tests/patches/ddp/lightning_workers.py) that Lightning runs on 2 CPU processes with gloo.

Runs in the matrix row of Lightning's torch (pytorch-lightning 1.9.5 with torch 2.0.1, Python 3.9). Each piece of
advice is followed: the strategy string or DDPStrategy(find_unused_parameters=False), and freezing the unused layer;
the run completes and its weights equal the run as written, bitwise, on both ranks.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import clean_env, marker_line

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_workers.py")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None,
                                 reason="needs pytorch-lightning 1.x (installed in the torch 2.0 matrix row)")]

DDP_CASES = [
    {"name": "as_written"},
    {"name": "followed", "knob": "string"},
    {"name": "accumulate", "accumulate": 2},
    {"name": "accumulate_followed", "accumulate": 2, "knob": False},
    {"name": "extra", "model": "extra"},
    {"name": "extra_followed", "model": "extra", "freeze": True, "knob": False},
]
SPAWN_CASES = [{"name": "as_written"}, {"name": "followed", "knob": False}]


def fit(strategy, cases, out):
    import torch
    proc = subprocess.run([sys.executable, SCRIPT, strategy, str(out), json.dumps(cases)], env=clean_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results, states = {}, {}
    for path in glob.glob(os.path.join(out, f"{strategy}.*.rank*.json")):
        _, case, rank = os.path.basename(path)[:-len(".json")].split(".")
        with open(path) as f:
            results[(case, int(rank[4:]))] = json.load(f)
        states[(case, int(rank[4:]))] = torch.load(path[:-len(".json")] + ".pt")
    assert len(results) == 2 * len(cases), sorted(results)
    return proc, results, states, torch


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return fit("ddp", DDP_CASES, tmp_path_factory.mktemp("lightning_ddp"))


@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    return fit("ddp_spawn", SPAWN_CASES, tmp_path_factory.mktemp("lightning_spawn"))


def note(result, text):
    return next(n for n in result["receipt"]["notes"] if text in n)


def assert_equal(states, torch, a, b):
    for rank in range(2):
        first, second = states[(a, rank)], states[(b, rank)]
        assert first.keys() == second.keys()
        assert all(torch.equal(first[n], second[n]) for n in first), (a, b, rank)
    assert all(torch.equal(states[(a, 0)][n], states[(a, 1)][n]) for n in states[(a, 0)])  # DDP kept ranks in step


def test_ddp_strategy_advice_names_fit_the_lightning_line_and_both_knobs(ddp):
    proc, results, states, torch = ddp
    fit_line = marker_line(SCRIPT, "lightning-fit")
    for rank in range(2):
        advice = note(results[("as_written", rank)], "iterations on every rank")
        assert f"for trainer.fit(...) at {fit_line}" in advice
        assert "pytorch_lightning/strategies/ddp.py:" in advice and "0 unused parameters in 4 iterations" in advice
        assert 'DDPStrategy(find_unused_parameters=False)' in advice
        assert 'strategy="ddp_find_unused_parameters_false"' in advice
        assert "static" not in advice and "SHIMS_DDP_SAFE_SITES" not in advice
        assert results[("followed", rank)]["find_unused_parameters"] is False
    decided = note(results[("as_written", 0)], "iterations on every rank").split("value decided at ")[1].split(":")[:2]
    with open(decided[0]) as f:
        assert '"find_unused_parameters", True' in f.read().splitlines()[int(decided[1]) - 1]
    assert_equal(states, torch, "as_written", "followed")
    # both ranks write to this console (Lightning starts rank 1 with it): logged once, so by one rank only
    assert proc.stderr.count("shims ddp: DistributedDataParallel built by lightning-ddp") == 1


def test_ddp_strategy_with_accumulate_grad_batches_advises_the_knob_never_static(ddp):
    _, results, states, torch = ddp
    for rank in range(2):
        advice = note(results[("accumulate", rank)], "iterations on every rank")
        assert "forwards inside no_sync()" in advice and "DDPStrategy(find_unused_parameters=False)" in advice
        assert "static" not in advice
    assert_equal(states, torch, "accumulate", "accumulate_followed")


def test_unused_layer_named_without_lightnings_wrapper_prefix_with_its_real_size(ddp):
    _, results, states, torch = ddp
    for rank in range(2):
        advice = note(results[("extra", rank)], "got no gradient")
        # 16x16 + 16 float32 = 1088 bytes in every iteration (torch 2.0.1's own counter accumulates across them)
        assert "every rank (2 ranks): extra.weight, extra.bias (1088 bytes)" in advice
        assert "_forward_module" not in advice and "freeze them" in advice
        assert results[("extra_followed", rank)]["find_unused_parameters"] is False
    assert_equal(states, torch, "extra", "extra_followed")


def test_ddp_spawn_strategy_advice_names_its_own_knob_and_following_it_works(spawn):
    _, results, states, torch = spawn
    for rank in range(2):
        advice = note(results[("as_written", rank)], "iterations on every rank")
        assert "lightning-ddp-spawn" in advice and "pytorch_lightning/strategies/ddp_spawn.py:" in advice
        # a spawned rank runs no user code: the advice says where the call is instead of naming a wrong line
        assert "for trainer.fit(...) (called in the process that started this rank" in advice
        assert 'DDPSpawnStrategy(find_unused_parameters=False)' in advice
        assert 'strategy="ddp_spawn_find_unused_parameters_false"' in advice
        assert results[("followed", rank)]["find_unused_parameters"] is False
    assert_equal(states, torch, "as_written", "followed")
