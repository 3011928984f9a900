"""ddp patch: find_unused_parameters is chosen before DDP is built, safely, and every rank agrees.

Fidelity: a DAMO-YOLO-style trainer (written here, laid out as damo/detectors/detector.py in a temporary folder)
trains an ultralytics YOLOv8n (from its yaml, no weights) and a timm model on 2 gloo ranks; with the patch DDP is
built with find_unused_parameters=False there and the weights equal the unpatched run's bitwise on every rank.
Safety: policies that make an unused parameter an error fail at once with the parameters' names, the policy and
the variable to change; ranks that would disagree are caught at construction. Every multi-process run has a hard
timeout (tests/patches/ddp/workers.launch) and a short process-group timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

import shims
from shims.patch import Skip
from tests.conftest import REPO, clean_env
from shims.errors import ShimsConfigError, ShimsPatchError
from shims.patches import ddp as ddp_patch
from tests.patches.ddp import workers as ddp_workers  # the worker script doubles as the launcher

# torch 2.1+ splits DDP.forward into _pre_forward/_post_forward and the unused-parameter search is timed; on torch 2.0
# it runs inside forward and the cost says it was not timed there
SEARCH_COST = "ms per iteration" if hasattr(__import__("torch").nn.parallel.DistributedDataParallel, "_post_forward") \
    else "not timed on this torch"

WORKER = os.path.join(REPO, "tests", "patches", "ddp", "workers.py")
NO_FINDING_WARNING = "did not find any unused parameters"  # printed by DDP's C++ reducer on stderr, not `warnings`
DEFAULTS = {"FIND_UNUSED": "auto", "SAFE_SITES": (), "OBSERVE": 50}


def build_line():
    """The line of the DistributedDataParallel(...) call in the workers' build_ddp (the call site tests expect)."""
    with open(WORKER) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def build_ddp("))
    return next(i + 1 for i in range(start, len(lines)) if "DistributedDataParallel(model" in lines[i])


def site(key, filename="x.py", lineno=1):
    module, _, function = key.partition(":")
    return ddp_patch.Site(module, function, function.rsplit(".", 1)[-1], filename, lineno)


# ---------------------------------------------------------------------------------------------------- the policy


def test_policy_keep_off_static_change_only_what_they_say():
    anywhere = site("train:main")
    keep = ddp_patch.find_unused_policy(dict(DEFAULTS, FIND_UNUSED="keep"), anywhere, True, False)
    off = ddp_patch.find_unused_policy(dict(DEFAULTS, FIND_UNUSED="off"), anywhere, True, False)
    static = ddp_patch.find_unused_policy(dict(DEFAULTS, FIND_UNUSED="static"), anywhere, True, False)
    assert (keep.find_unused, keep.static_graph, keep.changed, keep.observe) == (True, False, False, False)
    assert (off.find_unused, off.static_graph, off.changed) == (False, False, True)
    assert (static.find_unused, static.static_graph, static.changed, static.guard_first_sync) == (False, True, True,
                                                                                                  True)


def test_auto_turns_off_only_at_known_safe_sites_and_says_why():
    damo = ddp_patch.find_unused_policy(DEFAULTS, site("damo.detectors.detector:build_ddp_model"), True, False)
    assert (damo.find_unused, damo.changed, damo.observe) == (False, True, False)
    assert "known-safe site damo.detectors.detector:build_ddp_model" in damo.reason and "#153" in damo.reason

    ultralytics = ddp_patch.find_unused_policy(
        DEFAULTS, site("ultralytics.engine.trainer:BaseTrainer._setup_train"), True, False)
    assert (ultralytics.find_unused, ultralytics.changed, ultralytics.observe) == (True, False, True)
    assert "#24536" in ultralytics.reason and "known-unsafe" in ultralytics.reason

    elsewhere = ddp_patch.find_unused_policy(DEFAULTS, site("mytrain:fit"), True, False)
    assert (elsewhere.find_unused, elsewhere.changed, elsewhere.observe) == (True, False, True)

    listed = ddp_patch.find_unused_policy(dict(DEFAULTS, SAFE_SITES=("mytrain:fit",)), site("mytrain:fit"), True,
                                          False)
    assert (listed.find_unused, listed.changed, listed.variable) == (False, True, "SHIMS_DDP_SAFE_SITES")


def test_auto_leaves_false_and_static_graph_alone_and_detect_never_changes():
    damo = site("damo.detectors.detector:build_ddp_model")
    already_false = ddp_patch.find_unused_policy(DEFAULTS, damo, False, False)
    already_static = ddp_patch.find_unused_policy(DEFAULTS, damo, True, True)
    observed = ddp_patch.find_unused_policy(DEFAULTS, damo, True, False, mode="detect")
    assert not already_false.changed and not already_false.observe
    assert not already_static.changed and already_static.static_graph
    assert (observed.find_unused, observed.changed, observed.observe) == (True, False, True)
    no_observe = ddp_patch.find_unused_policy(dict(DEFAULTS, OBSERVE=0), site("mytrain:fit"), True, False)
    assert not no_observe.observe


def test_call_site_is_the_caller_of_the_outermost_init():
    class Base:
        def __init__(self):
            self.site = ddp_patch.call_site(self, sys._getframe(1))

    class Sub(Base):
        def __init__(self):
            super().__init__()

    def build_model():
        return Sub()

    found = build_model().site
    assert (found.module, found.name) == (__name__, "build_model")
    assert found.key == f"{__name__}:test_call_site_is_the_caller_of_the_outermost_init.<locals>.build_model"
    assert found.matches({f"{__name__}:build_model": "x"}) == f"{__name__}:build_model"
    assert found.filename == __file__


def test_bad_values_are_clear_errors():
    with pytest.raises(ShimsConfigError) as bad_policy:
        shims.enable(patches=["ddp"], options={"SHIMS_DDP_FIND_UNUSED": "of"})
    text = str(bad_policy.value)
    # named as the user wrote it: the argument of shims.enable (the environment variable when set there)
    assert "shims.enable(options={'SHIMS_DDP_FIND_UNUSED': 'of'})" in text and "auto, keep, off, static" in text
    assert "'off'" in text
    with pytest.raises(ShimsConfigError, match="SHIMS_DDP_SAFE_SITES.*not a call site.*module:function"):
        shims.enable(patches=["ddp"], options={"SHIMS_DDP_SAFE_SITES": "damo.detectors.detector"})


def test_fingerprint_accepts_this_torch_and_refuses_a_different_init():
    import torch.nn.parallel.distributed as distributed
    assert ddp_patch.fingerprint(distributed.DistributedDataParallel.__init__) is None

    def __init__(self, module, find_unused_parameters=False):  # no static_graph: an older or different DDP
        pass

    with pytest.raises(Skip, match="static_graph"):
        ddp_patch.fingerprint(__init__)


# ---------------------------------------------------------------------------------------------------- one process


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """A world of one gloo rank in this process (a file store: no port), destroyed after these tests."""
    import torch
    import torch.distributed as dist
    store = tmp_path_factory.mktemp("ddp_store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield torch
    dist.destroy_process_group()


def build_here(model, **kwargs):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, **kwargs)


def build_subclass_here(model, **kwargs):
    from torch.nn.parallel import DistributedDataParallel

    class Subclass(DistributedDataParallel):  # its __init__ frame is skipped: the site is this function
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)

    return Subclass(model, **kwargs)


def test_in_process_safe_site_is_built_false_and_disable_restores_everything(single_rank):
    torch = single_rank
    from torch.nn.parallel import DistributedDataParallel
    original = DistributedDataParallel.__init__
    sites = f"{__name__}:build_here,{__name__}:build_subclass_here"
    receipt = shims.enable(patches=["ddp"], options={"SHIMS_DDP_SAFE_SITES": sites, "SHIMS_DDP_OBSERVE": "0"})
    assert receipt["patches"]["ddp"]["status"] == "applied"
    assert DistributedDataParallel.__init__ is not original
    assert torch.nn.parallel.DistributedDataParallel is DistributedDataParallel  # one class: every alias patched
    ddp = build_here(torch.nn.Linear(3, 2), find_unused_parameters=True)
    sub = build_subclass_here(torch.nn.Linear(3, 2), find_unused_parameters=True)
    elsewhere = DistributedDataParallel(torch.nn.Linear(3, 2), find_unused_parameters=True)
    assert ddp.find_unused_parameters is False and sub.find_unused_parameters is False
    assert elsewhere.find_unused_parameters is True  # built in this test function: not a listed site
    ddp(torch.randn(4, 3)).sum().backward()
    notes = shims.status()["patches"]["ddp"]["notes"]
    for function in ("build_here", "build_subclass_here"):
        assert any(f"({__name__}:{function}): find_unused_parameters=True, static_graph=False -> "
                   "find_unused_parameters=False" in n for n in notes), notes
    # the error explainer sits on the objects shims changed; with SHIMS_DDP_OBSERVE=0 nothing observes the others
    hook = "_pre_forward" if hasattr(type(ddp), "_pre_forward") else "forward"  # torch 2.0 has no _pre_forward
    assert hook in ddp.__dict__ and hook not in elsewhere.__dict__

    shims.disable()
    assert DistributedDataParallel.__init__ is original
    assert hook not in ddp.__dict__ and hook not in sub.__dict__


def test_in_process_a_shims_failure_builds_ddp_as_written_or_raises_in_strict_mode(single_rank, monkeypatch):
    torch = single_rank

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr("shims.patches.ddp.patch.find_unused_policy", broken)
    shims.enable(patches=["ddp"], options={"SHIMS_DDP_FIND_UNUSED": "off"})
    ddp = build_here(torch.nn.Linear(3, 2), find_unused_parameters=True)
    assert ddp.find_unused_parameters is True
    record = shims.status()["patches"]["ddp"]
    assert record["status"] == "error" and "ValueError: boom; DDP built as written" in record["reason"]

    shims.enable(patches=["ddp"], strict=True, options={"SHIMS_DDP_FIND_UNUSED": "off"})
    with pytest.raises(ShimsPatchError, match="could not decide the find_unused_parameters policy: ValueError"):
        build_here(torch.nn.Linear(3, 2), find_unused_parameters=True)


def test_in_process_warnings_still_point_at_the_users_line(single_rank):
    import warnings
    torch = single_rank
    with warnings.catch_warnings(record=True) as plain:  # whether this torch warns, asked before shims is there
        warnings.simplefilter("always")
        build_here(torch.nn.Linear(3, 2), broadcast_buffers=False)
    if not plain:
        pytest.skip(f"torch {torch.__version__} does not warn about broadcast_buffers")
    shims.enable(patches=["ddp"], options={"SHIMS_DDP_FIND_UNUSED": "keep"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_here(torch.nn.Linear(3, 2), broadcast_buffers=False)  # deprecated in this torch: a FutureWarning
    assert {(os.path.basename(w.filename), w.category.__name__) for w in caught} == {("test_ddp.py", "FutureWarning")}


# ---------------------------------------------------------------------------------------------------- 2 ranks


def assert_clean(ranks):
    assert not ranks.timed_out, ranks.describe()
    assert ranks.returncodes == [0, 0], ranks.describe()


def has(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (has("ultralytics") and has("timm")), reason="needs ultralytics and timm installed")
def test_damo_yolo_style_trainer_bitwise_equal_with_find_unused_off(tmp_path):
    import torch
    root = ddp_workers.write_damo_layout(tmp_path / "damo_root")
    # TORCH_CPP_LOG_LEVEL: torch's default, whatever the environment running the suite says (see the warning below)
    base = dict(YOLO_CONFIG_DIR=str(tmp_path / "yolo_settings"), YOLO_OFFLINE="1", TORCH_CPP_LOG_LEVEL="WARNING")
    args = ["--root", root, "--models", "yolo,timm", "--steps", "4"]
    plain = ddp_workers.launch("damo", tmp_path / "plain", envs=[clean_env(**base)] * 2, args=args, timeout=170)
    assert_clean(plain)
    patched = ddp_workers.launch("damo", tmp_path / "patched", envs=[clean_env(SHIMS_PATCHES="ddp", **base)] * 2,
                                 args=args + ["--shims"], timeout=170)
    assert_clean(patched)
    for rank in range(2):
        assert plain.results[rank]["models"] == {k: {"find_unused_parameters": True, "static_graph": False}
                                                 for k in ("yolo", "timm")}
        assert patched.results[rank]["models"] == {k: {"find_unused_parameters": False, "static_graph": False}
                                                   for k in ("yolo", "timm")}
        # DDP's own C++ warning: printed by the unpatched rank, gone from the patched one (clean_env keeps an
        # ultralytics import elsewhere in the suite from silencing it with TORCH_CPP_LOG_LEVEL=ERROR)
        assert NO_FINDING_WARNING in plain.stderr[rank], plain.describe()
        assert NO_FINDING_WARNING not in patched.stderr[rank], patched.describe()
        reference, fixed = plain.params(rank), patched.params(rank)
        assert reference.keys() == fixed.keys() and len(reference) > 100
        different = [n for n in reference if not torch.equal(reference[n], fixed[n])]
        assert not different, f"rank {rank}: {len(different)} tensors differ, e.g. {different[:3]}"
        receipt = patched.results[rank]["receipt"]
        assert receipt["counters"]["find_unused_turned_off"] == 2
        assert all("known-safe site damo.detectors.detector:build_ddp_model" in n and "detector.py:" in n
                   for n in receipt["notes"])
    assert all(torch.equal(a, b) for a, b in zip(patched.params(0).values(), patched.params(1).values()))


CASES = [
    # name, options, the toy's unused parameter, and the rest of run_toy's settings
    {"name": "keep_const", "options": {"SHIMS_DDP_FIND_UNUSED": "keep"}, "unused": "const"},
    {"name": "off_const", "options": {"SHIMS_DDP_FIND_UNUSED": "off"}, "unused": "const"},
    {"name": "static_const", "options": {"SHIMS_DDP_FIND_UNUSED": "static"}, "unused": "const"},
    {"name": "plain_change", "shims": False, "unused": "change"},
    {"name": "static_change", "options": {"SHIMS_DDP_FIND_UNUSED": "static"}, "unused": "change"},
    {"name": "off_change", "options": {"SHIMS_DDP_FIND_UNUSED": "off"}, "unused": "change"},
    {"name": "plain_static_accumulate", "shims": False, "accumulate": True, "as_written": ["false", "false"],
     "static_graph": True},
    {"name": "static_accumulate", "options": {"SHIMS_DDP_FIND_UNUSED": "static"}, "accumulate": True},
    {"name": "keep_none", "options": {"SHIMS_DDP_FIND_UNUSED": "keep"}},
    {"name": "safe_none", "options": {"SHIMS_DDP_SAFE_SITES": "__main__:build_ddp"}},
    {"name": "safe_const", "options": {"SHIMS_DDP_SAFE_SITES": "__main__:build_ddp"}, "unused": "const"},
    {"name": "auto_none", "options": {"SHIMS_DDP_OBSERVE": "5"}, "steps": 8},
    {"name": "auto_const", "options": {"SHIMS_DDP_OBSERVE": "5"}, "steps": 8, "unused": "const"},
    {"name": "detect_none", "mode": "detect", "options": {"SHIMS_DDP_OBSERVE": "5"}, "steps": 8},
    {"name": "disagree", "per_rank": {"0": {"SHIMS_DDP_FIND_UNUSED": "off"}, "1": {"SHIMS_DDP_FIND_UNUSED": "keep"}}},
    {"name": "disagree_strict", "strict": True,
     "per_rank": {"0": {"SHIMS_DDP_FIND_UNUSED": "off"}, "1": {"SHIMS_DDP_FIND_UNUSED": "keep"}}},
    {"name": "disagree_as_written", "options": {"SHIMS_DDP_FIND_UNUSED": "keep"}, "as_written": ["true", "false"]},
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """All toy cases, run once on 2 ranks in one launch (shims configured per case in-process, per rank if asked)."""
    out = tmp_path_factory.mktemp("ddp_cases")
    ranks = ddp_workers.launch("cases", out, envs=[clean_env()] * 2,
                               args=["--cases", json.dumps(CASES), "--pg-timeout", "30"], timeout=200)
    assert_clean(ranks)
    import torch
    states = [ranks.params(r) for r in range(2)]
    return [dict(ranks.results[r]["cases"]) for r in range(2)], states, torch


def each_rank(cases, name):
    results, _, _ = cases
    return [results[r][name] for r in range(2)]


@pytest.mark.slow
def test_wrongly_forced_off_fails_loudly_naming_the_parameters_on_both_ranks(cases):
    for rank, result in enumerate(each_rank(cases, "off_const")):
        error = result["error"]
        assert error["type"] == "UnusedParameterError", error
        assert error["names"] == ["extra.weight", "extra.bias"]
        assert error["policy"] == "off" and error["variable"] == "SHIMS_DDP_FIND_UNUSED"
        assert f"on rank {rank}, 2 parameter(s) received no gradient" in error["message"]
        assert "SHIMS_DDP_FIND_UNUSED=off" in error["message"] and "Set SHIMS_DDP_FIND_UNUSED=keep" in error["message"]
        assert f"workers.py:{build_line()} (__main__:build_ddp)" in error["message"]
        assert result["steps_done"] == 1  # the next forward stops it: one step, not a silently diverging run
        assert result["receipt"]["counters"]["unused_parameter_errors"] == 1


@pytest.mark.slow
def test_a_wrong_safe_site_names_SHIMS_DDP_SAFE_SITES(cases):
    for result in each_rank(cases, "safe_const"):
        assert result["error"]["type"] == "UnusedParameterError"
        assert result["error"]["variable"] == "SHIMS_DDP_SAFE_SITES"
        assert "Remove the site from SHIMS_DDP_SAFE_SITES" in result["error"]["message"]
        assert result["error"]["names"] == ["extra.weight", "extra.bias"]


@pytest.mark.slow
def test_static_with_a_constant_unused_set_trains_bitwise_like_keep(cases):
    _, states, torch = cases
    for rank, result in enumerate(each_rank(cases, "static_const")):
        assert result["error"] is None and result["steps_done"] == 4
        assert (result["find_unused_parameters"], result["static_graph"]) == (False, True)
        keep, static = states[rank]["keep_const"], states[rank]["static_const"]
        assert keep.keys() == static.keys()
        assert all(torch.equal(keep[n], static[n]) for n in keep), rank
        initial = dict(ddp_workers.toy_model(torch).named_parameters())
        assert not torch.equal(static["body.0.weight"], initial["body.0.weight"])  # it did train
        assert torch.equal(static["extra.weight"], initial["extra.weight"])  # and never touched the unused one


@pytest.mark.slow
def test_safe_site_off_trains_bitwise_like_keep(cases):
    _, states, torch = cases
    for rank, result in enumerate(each_rank(cases, "safe_none")):
        assert result["error"] is None and result["find_unused_parameters"] is False
        keep, off = states[rank]["keep_none"], states[rank]["safe_none"]
        assert all(torch.equal(keep[n], off[n]) for n in keep), rank
    assert all(torch.equal(a, b) for a, b in zip(states[0]["safe_none"].values(), states[1]["safe_none"].values()))


@pytest.mark.slow
def test_a_changing_unused_set_fails_clearly_under_static_and_off(cases):
    for result in each_rank(cases, "plain_change"):
        assert result["error"] is None and result["steps_done"] == 4  # True handles it: the reference run
    for name, policy, cause in (("static_change", "static", "static_graph=True, chosen by SHIMS_DDP_FIND_UNUSED"),
                                ("off_change", "off", "find_unused_parameters=False, chosen by shims")):
        for result in each_rank(cases, name):
            error = result["error"]
            assert error["type"] == "UnusedParameterError", (name, error)
            assert error["names"] == ["extra.weight", "extra.bias"] and error["policy"] == policy
            assert cause in error["message"]
            assert result["steps_done"] == 2  # step 1 left `extra` without gradient; the forward of step 2 stops


@pytest.mark.slow
def test_static_refuses_a_first_backward_inside_no_sync(cases):
    for result in each_rank(cases, "plain_static_accumulate"):  # what torch does without shims (pytorch#143580)
        assert "INTERNAL ASSERT FAILED" in result["error"]["message"]
    for result in each_rank(cases, "static_accumulate"):
        error = result["error"]
        assert error["type"] == "UnusedParameterError" and result["steps_done"] == 0
        assert "first forward runs inside no_sync()" in error["message"] and "pytorch#143580" in error["message"]
        assert "SHIMS_DDP_FIND_UNUSED=keep or off" in error["message"]


@pytest.mark.slow
def test_auto_elsewhere_keeps_the_flag_and_advises_from_both_ranks_evidence(cases):
    for result in each_rank(cases, "auto_none"):
        assert result["find_unused_parameters"] is True and result["error"] is None
        assert result["receipt"]["counters"]["iterations_observed"] == 5
        note = next(n for n in result["receipt"]["notes"] if "0 unused parameters" in n)
        assert "find_unused_parameters=True but 0 unused parameters in 5 iterations on every rank (2 ranks)" in note
        assert f"To act on it: DistributedDataParallel(..., find_unused_parameters=False) at " in note
        assert f"workers.py:{build_line()}" in note and SEARCH_COST in note and "static" not in note
    for result in each_rank(cases, "auto_const"):
        assert result["find_unused_parameters"] is True and result["error"] is None and result["steps_done"] == 8
        note = next(n for n in result["receipt"]["notes"] if "got no gradient" in n)
        # named as the model names them, with their real size (16x16 + 16 float32: 1088 bytes)
        assert "the same 2 parameter(s) got no gradient in every one of 5 iterations on every rank (2 ranks): " \
               "extra.weight, extra.bias (1088 bytes)" in note, note
        assert "freeze them (`.requires_grad_(False)` on extra.weight, extra.bias) or remove them" in note


@pytest.mark.slow
def test_detect_mode_builds_ddp_unchanged_and_reports_a_finding_at_the_call_site(cases):
    for result in each_rank(cases, "detect_none"):
        assert result["find_unused_parameters"] is True and result["static_graph"] is False
        (finding,) = result["receipt"]["findings"]
        assert finding["message"].endswith("find_unused_parameters=True but 0 unused parameters in 5 iterations on "
                                           "every rank (2 ranks)")
        assert finding["where"].endswith(f"workers.py:{build_line()}")
        assert finding["site"] == f"ddp:__main__:build_ddp@{finding['where']}"
        assert set(finding["ranks"]) == {"0", "1"}
        assert SEARCH_COST in finding["cost"] and "find_unused_parameters=False" in finding["fix"]
        assert "static" not in finding["fix"]


@pytest.mark.slow
def test_ranks_that_disagree_are_caught_at_construction(cases):
    for result in each_rank(cases, "disagree"):  # non-strict: every rank builds DDP as written, and trains
        assert result["error"] is None and result["steps_done"] == 4 and result["find_unused_parameters"] is True
        assert result["receipt"]["status"] == "error"
        assert "rank 0: policy off" in result["receipt"]["reason"] and "rank 1: policy keep" in \
            result["receipt"]["reason"]
    for result in each_rank(cases, "disagree_strict"):
        assert result["error"]["type"] == "ShimsPatchError" and result["steps_done"] == 0
        assert "ranks disagree" in result["error"]["message"] and "SHIMS_STRICT=1" in result["error"]["message"]
    for result in each_rank(cases, "disagree_as_written"):
        assert result["error"]["type"] == "RanksDisagreeError" and result["steps_done"] == 0
        assert "The arguments as written differ between ranks too" in result["error"]["message"]


@pytest.mark.slow
def test_different_environment_per_rank_is_refused_before_training(tmp_path):
    """The real setting: each rank starts shims from its own environment (import shims.auto, SHIMS_* variables)."""
    envs = [clean_env(SHIMS_PATCHES="ddp", SHIMS_STRICT="1", SHIMS_DDP_FIND_UNUSED=policy) for policy in ("off", "keep")]
    ranks = ddp_workers.launch("toy", tmp_path / "env", envs=envs, args=["--shims", "--pg-timeout", "30"],
                               timeout=120)
    assert not ranks.timed_out, ranks.describe()
    assert ranks.returncodes == [3, 3], ranks.describe()
    for result in ranks.results:
        assert result["steps_done"] == 0 and result["error"]["type"] == "ShimsPatchError"
        assert "rank 0: policy off" in result["error"]["message"]
        assert "rank 1: policy keep" in result["error"]["message"]
        assert "Set the same SHIMS_DDP_FIND_UNUSED and SHIMS_DDP_SAFE_SITES on every rank" in result["error"]["message"]
