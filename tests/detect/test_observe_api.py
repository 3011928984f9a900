"""`with shims.observe() as report:` in a test or notebook: typed findings, suppressions on the line, framework
findings that name the framework, its version, its line and the user's line that reached it; the report helpers
(SHIMS_IGNORE parsing, ranking) on their own."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import nn

import shims
from shims.detect import results
from shims.errors import ShimsConfigError
from tests.conftest import write
from tests.detect.conftest import line_with

EVALUATE = """
import torch


def evaluate(model, batches):
    for x in batches:
        model(x)  # shims: ignore[eval-with-grad]
    for x in batches:
        model(x)
    for x in batches:
        model(x)  # shims: ignore[unused-forward]
"""

FRAMEWORK = """
__version__ = "9.8.7"


def validate(model, batches):
    return [model(x) for x in batches]
"""


def train_a_little(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()


@pytest.fixture
def importable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("evaluate_here", "fakeframework"):
        sys.modules.pop(name, None)


def test_observe_gives_typed_findings_and_a_comment_silences_exactly_its_finding(importable):
    path = write(importable / "evaluate_here.py", EVALUATE)
    evaluate = importlib.import_module("evaluate_here").evaluate
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    batches = [torch.randn(4, 3) for _ in range(2)]
    with shims.observe() as report:
        train_a_little(model)
        model.eval()
        evaluate(model, batches)
        model.train()
        train_a_little(model)
    assert all(isinstance(f, results.Finding) for f in report.findings + report.suppressed)
    silenced = line_with(path, "# shims: ignore[eval-with-grad]")
    other_kind = line_with(path, "# shims: ignore[unused-forward]")
    plain = f"{path}:{int(silenced.rpartition(':')[2]) + 2}"
    assert [(f.kind, f.where, f.count) for f in report.suppressed] == [("eval-with-grad", silenced, 2)]
    assert report.suppressed[0].suppressed.startswith("`# shims: ignore[eval-with-grad]`")
    # a comment naming another kind silences nothing: that line is still reported
    assert {(f.kind, f.where) for f in report.findings} == {("eval-with-grad", plain), ("eval-with-grad", other_kind)}
    assert report.observed.optimizer_steps == 6 and report.observed.evaluations == 1
    assert report.summary.startswith("2 findings (1 suppressed)")


def test_a_finding_in_framework_code_names_the_framework_and_the_users_line(importable):
    package = importable / "site-packages" / "fakeframework"
    package.mkdir(parents=True)
    write(package / "__init__.py", FRAMEWORK)
    sys.path.insert(0, str(importable / "site-packages"))
    try:
        validate = importlib.import_module("fakeframework").validate
        model = nn.Linear(3, 3)
        with shims.observe() as report:
            train_a_little(model)
            model.eval()
            validate(model, [torch.randn(4, 3)])  # the user's call
    finally:
        sys.path.remove(str(importable / "site-packages"))
    [found] = report.findings
    assert found.kind == "eval-with-grad"
    assert found.where == line_with(str(package / "__init__.py"), "return [model(x) for x in batches]")
    assert (found.framework, found.framework_version) == ("fakeframework", "9.8.7")
    assert found.user_where == line_with(__file__, "# the user" + "'s call")


def test_nothing_observed_without_a_forward_and_no_findings_only_after_training():
    with shims.observe() as idle:
        pass
    assert idle.summary == "nothing observed: torch was imported, but no forward and no optimizer step ran"
    model = nn.Linear(3, 3)
    with shims.observe() as trained:
        train_a_little(model)
    assert trained.findings == () and trained.summary.startswith("no findings; observed 3 optimizer steps")
    with shims.observe() as evaluated:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3))
    assert "training was not observed" in evaluated.summary and "no findings" in evaluated.summary


def test_shims_ignore_is_parsed_and_refused_with_what_is_valid():
    from shims import config
    assert config.parse_ignores("eval-with-grad@train.py:88, doctr:dead-forward@/a/b.py:3") == \
        (("eval-with-grad", "train.py", 88), ("doctr:dead-forward", "/a/b.py", 3))
    for bad in ("eval-with-grad@train.py", "train.py:88", "Eval@x.py:1", "eval-with-grad@:4"):
        with pytest.raises(ShimsConfigError, match="kind@file:line"):
            config.parse_ignores(bad)


def test_ranking_puts_per_step_costs_first_and_one_time_costs_last():
    def finding(kind, **numbers):
        return results.Finding(kind=kind, where=f"x.py:{len(kind)}", count=1, message=kind, **numbers)
    ranked = sorted([finding("once", per="one-time", seconds_once=9.0), finding("estimate"),
                     finding("memory", bytes=1024), finding("small", seconds_per_step=0.001),
                     finding("large", seconds_per_step=0.5)], key=results.rank_key)
    assert [f.kind for f in ranked] == ["large", "small", "memory", "estimate", "once"]
