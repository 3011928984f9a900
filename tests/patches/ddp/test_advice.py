"""The advice rules and the site table, without processes: what every rank's evidence allows to be said.

The real-framework tests (test_frameworks.py, test_lightning.py) follow the advice; these pin the rules that keep it
safe: nothing from one rank alone, nothing where the set changes, nothing at a site where the flag is needed, never
static_graph, parameters named as the user's model names them.
"""

from __future__ import annotations

from shims.patches.ddp import FRAMEWORK_SITES, SAFE_SITES, Site, advise, user_name
from shims.patches.ddp.policy import FIXED_UPSTREAM, NEEDED, SAFE, find_unused_policy

DEFAULTS = {"FIND_UNUSED": "auto", "SAFE_SITES": (), "OBSERVE": 50}


def framework(name):
    return next(s for s in FRAMEWORK_SITES if s.name == name)


def trainer_site():
    site = Site("accelerate.accelerator", "Accelerator.prepare_model", "prepare_model", "accelerator.py", 2032)
    site.framework, site.user_where, site.decided_at = framework("transformers-trainer"), "train.py:78", "trainer.py:2199"
    return site


def evidence(sets, no_sync=0, observed=5, nbytes=0):
    return {"observed": observed, "no_sync": no_sync, "sets": sets, "bytes": nbytes}


def test_zero_unused_on_every_rank_advises_the_knob_with_its_condition_never_static():
    message, fix, names = advise(trainer_site(), {0: evidence([[]], no_sync=5), 1: evidence([[]], no_sync=5)}, [0, 1])
    assert "for trainer.train() at train.py:78, value decided at trainer.py:2199" in message
    assert "0 unused parameters in 5 iterations on every rank (2 ranks)" in message and "no_sync()" in message
    assert fix.startswith("TrainingArguments(ddp_find_unused_parameters=False) if no batch") and names == ()
    assert "static" not in message + fix and "SHIMS_DDP_SAFE_SITES" not in fix


def test_a_constant_set_on_every_rank_is_named_and_a_changing_or_partial_one_advises_nothing():
    same = {r: evidence([["extra.weight", "extra.bias"]], nbytes=1088) for r in (0, 1)}
    message, fix, names = advise(trainer_site(), same, [0, 1])
    assert names == ("extra.weight", "extra.bias") and "(1088 bytes)" in message
    assert fix.startswith("freeze them (`.requires_grad_(False)` on extra.weight, extra.bias)")
    changing = {0: evidence([[], ["extra.weight"]]), 1: evidence([[]])}
    assert advise(trainer_site(), changing, [0, 1])[1] is None
    ranks_differ = {0: evidence([["extra.weight"]]), 1: evidence([[]])}
    assert advise(trainer_site(), ranks_differ, [0, 1])[1] is None
    message, fix, _ = advise(trainer_site(), {0: evidence([[]])}, [0, 1])
    assert fix is None and "rank(s) [1] shared no observation" in message


def test_a_site_where_the_flag_is_needed_never_gets_advice():
    site = trainer_site()
    site.framework = framework("ultralytics")
    message, fix, _ = advise(site, {0: evidence([[]]), 1: evidence([[]])}, [0, 1])
    assert fix is None and "is needed here" in message and "#24536" in message


def test_the_table_switches_only_safe_sites_and_keeps_needed_ones():
    assert [s.name for s in FRAMEWORK_SITES if s.automatic] == ["damo-yolo"]
    assert set(SAFE_SITES) == {"damo.detectors.detector:build_ddp_model"}
    for site in FRAMEWORK_SITES:
        assert site.verdict != SAFE or site.builds in SAFE_SITES
        assert site.verdict != NEEDED or site.knob.startswith("(none")
    # the frameworks that drive others come first: RF-DETR through Lightning is still RF-DETR
    names = [s.name for s in FRAMEWORK_SITES]
    assert names.index("rf-detr") < names.index("lightning-ddp") and names.index("transformers-trainer") < \
        names.index("accelerate")
    assert framework("lightning-ddp").fixed_as == "lightning-2" and framework("lightning-2").verdict == FIXED_UPSTREAM
    shared = trainer_site()
    decision = find_unused_policy(DEFAULTS, shared, True, False)
    assert not decision.changed and decision.observe and "never switched automatically" in decision.reason


def test_parameter_names_lose_the_wrappers_prefixes():
    assert user_name("_forward_module.extra.weight") == "extra.weight"
    assert user_name("module._orig_mod.head.bias") == "head.bias"
    assert user_name("model.module_list.0.weight") == "model.module_list.0.weight"
