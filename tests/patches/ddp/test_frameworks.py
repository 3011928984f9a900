"""ddp advice where most users build DDP: the transformers Trainer and accelerate, 2 gloo ranks, tiny models from
configs (tests/patches/ddp/framework_workers.py; nothing from a hub).

Each piece of advice is followed in a test: the run with the knob the advice names (and the freezing it suggests)
completes and its weights equal, bitwise, the run as written. Advice names the user's line (marked in the worker),
the framework line that decided the value, and the knob; never static_graph, never a shared framework function as
a safe site; it is logged once, on rank 0 only, at WARNING.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from tests.conftest import clean_env, marker_line
from tests.patches.ddp import workers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "framework_workers.py")
TRAINER_KNOB = "TrainingArguments(ddp_find_unused_parameters=False)"
ACCELERATE_KNOB = "DistributedDataParallelKwargs(find_unused_parameters=False)"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                 or importlib.util.find_spec("accelerate") is None,
                                 reason="needs transformers and accelerate (the test extras of this row lack them)")]

TRAINER_CASES = [
    {"name": "as_written"},
    {"name": "followed", "knob": False},
    {"name": "accumulate", "accumulate": 2},
    {"name": "accumulate_followed", "accumulate": 2, "knob": False},
    {"name": "extra", "model": "extra"},
    {"name": "extra_followed", "model": "extra", "freeze": True, "knob": False},
    {"name": "detect", "mode": "detect"},
]
ACCELERATE_CASES = [
    {"name": "as_written", "knob": True},
    {"name": "followed", "knob": False},
    {"name": "extra", "model": "extra", "knob": True},
    {"name": "extra_followed", "model": "extra", "freeze": True, "knob": False},
]


def run(framework, cases, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ddp_{framework}")
    ranks = workers.launch(framework, out, envs=[clean_env(HF_HUB_OFFLINE="1")] * 2, timeout=400,
                           args=["--cases", json.dumps(cases)], script="framework_workers.py")
    assert not ranks.timed_out and ranks.returncodes == [0, 0], ranks.describe()
    import torch
    return ranks, [ranks.results[r]["cases"] for r in range(2)], [ranks.params(r) for r in range(2)], torch


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return run("trainer", TRAINER_CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def accelerate(tmp_path_factory):
    return run("accelerate", ACCELERATE_CASES, tmp_path_factory)


def advice(result):
    """The note that ends the observation (what the user reads)."""
    return next(n for n in result["receipt"]["notes"] if "iterations on every rank" in n)


def assert_equal(states, torch, a, b):
    """Runs a and b ended with bitwise-equal parameters on every rank, and the ranks agree (DDP kept them in step)."""
    for state in states:
        assert state[a].keys() == state[b].keys()
        for name in state[a]:
            assert torch.equal(state[a][name], state[b][name]), (a, b, name)
    assert all(torch.equal(states[0][a][n], states[1][a][n]) for n in states[0][a])


def test_trainer_advice_names_the_train_line_the_trainer_line_and_the_knob(trainer):
    ranks, results, _, _ = trainer
    train_line = marker_line(WORKER, "trainer-train")
    for rank in range(2):
        result = results[rank]["as_written"]
        assert result["error"] is None and result["find_unused_parameters"] is True
        note = advice(result)
        assert f"for trainer.train() at {train_line}" in note
        assert "transformers/trainer.py:" in note and "0 unused parameters in 4 iterations on every rank" in note
        assert f"To act on it: {TRAINER_KNOB}" in note
        assert "static" not in note and "SHIMS_DDP_SAFE_SITES" not in note
    # the framework line is the one that decided: a PreTrainedModel gets `not model.is_gradient_checkpointing`
    decided = advice(results[0]["as_written"]).split("value decided at ")[1].split(":")
    with open(decided[0]) as f:
        assert "not model.is_gradient_checkpointing" in f.read().splitlines()[int(decided[1]) - 1]
    # logged once, at WARNING (the console gets it without SHIMS_LOG), on rank 0 only (one site: later cases reuse it)
    logged = "shims ddp: DistributedDataParallel built by transformers-trainer"
    assert ranks.stderr[0].count(logged) == 1 and TRAINER_KNOB in ranks.stderr[0]
    assert logged not in ranks.stderr[1]


def test_trainer_knob_followed_trains_bitwise_like_the_run_as_written(trainer):
    _, results, states, torch = trainer
    assert [results[r]["followed"]["find_unused_parameters"] for r in range(2)] == [False, False]
    assert_equal(states, torch, "as_written", "followed")


def test_trainer_with_gradient_accumulation_advises_the_knob_not_static_and_it_works(trainer):
    _, results, states, torch = trainer
    for rank in range(2):
        note = advice(results[rank]["accumulate"])
        assert "forwards inside no_sync(): gradient accumulation" in note and f"To act on it: {TRAINER_KNOB}" in note
        assert "static" not in note
        assert results[rank]["accumulate_followed"]["error"] is None
    assert_equal(states, torch, "accumulate", "accumulate_followed")


def test_trainer_unused_layer_is_named_and_freezing_it_then_the_knob_trains_bitwise_alike(trainer):
    _, results, states, torch = trainer
    for rank in range(2):
        note = next(n for n in results[rank]["extra"]["receipt"]["notes"] if "got no gradient" in n)
        # 16x16 + 16 float32 = 1088 bytes, named as the model names them
        assert "the same 2 parameter(s) got no gradient in every one of 4 iterations on every rank (2 ranks): " \
               "extra.weight, extra.bias (1088 bytes)" in note
        assert "freeze them" in note and TRAINER_KNOB in note
        # a plain nn.Module: the Trainer's third branch decided (`= True`)
        decided = note.split("value decided at ")[1].split(":")
        with open(decided[0]) as f:
            assert '["find_unused_parameters"] = True' in f.read().splitlines()[int(decided[1]) - 1]
        assert results[rank]["extra_followed"]["find_unused_parameters"] is False
    assert_equal(states, torch, "extra", "extra_followed")


def test_doctor_finding_at_the_users_line_with_site_key_framework_line_and_knob(trainer):
    _, results, _, _ = trainer
    train_line = marker_line(WORKER, "trainer-train")
    findings = [results[r]["detect"]["receipt"]["findings"] for r in range(2)]
    for (finding,) in findings:
        assert finding["kind"] == "find-unused-parameters" and finding["where"] == train_line
        assert finding["site"] == f"ddp:transformers-trainer@{train_line}"
        assert finding["knob"] == TRAINER_KNOB and finding["fix"].startswith(TRAINER_KNOB)
        assert "transformers/trainer.py:" in finding["decided_at"]
        # DDP is built by the framework (transformers 4.x: accelerate's prepare; older: the Trainer itself)
        assert re.search(r"(accelerate/accelerator|transformers/trainer)\.py:\d+$", finding["built_at"]), finding
        assert set(finding["ranks"]) == {"0", "1"}
    assert findings[0][0]["message"] == findings[1][0]["message"]  # the same finding on both ranks: one to merge


def test_accelerate_advice_names_the_prepare_line_and_the_kwargs_knob_and_following_it_works(accelerate):
    _, results, states, torch = accelerate
    prepare_line = marker_line(WORKER, "accelerate-prepare")
    for rank in range(2):
        note = advice(results[rank]["as_written"])
        assert f"for accelerator.prepare(...) at {prepare_line}" in note and ACCELERATE_KNOB in note
        assert "accelerate/accelerator.py:" in note and "SHIMS_DDP_SAFE_SITES" not in note
        assert results[rank]["followed"]["find_unused_parameters"] is False
        extra = next(n for n in results[rank]["extra"]["receipt"]["notes"] if "got no gradient" in n)
        assert "extra.weight, extra.bias" in extra and ACCELERATE_KNOB in extra
        assert results[rank]["extra_followed"]["error"] is None
    assert_equal(states, torch, "as_written", "followed")
    assert_equal(states, torch, "extra", "extra_followed")
