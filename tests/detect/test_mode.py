"""The observe-only mode itself: installed and reverted completely, torch.compile unchanged and quiet, nothing in fix
mode, a patch's own check not reported twice, a failing detector never breaks training, the documented keys."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import shims
from shims import detect
from shims.detect.detectors import forwards
from tests.detect.conftest import (assert_compiled_training_unchanged_and_quiet, batch_transforms, fit_one_epoch_buggy,
                                   make_bn_mlp, make_training, observe)


# ---------------------------------------------------------------- the mode itself


def test_detectors_are_installed_and_reverted_completely():
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks
    from torch.utils.data import dataloader
    watched = [(nn.Module, "half"), (nn.Module, "to"), (torch.Tensor, "item"), (torch.Tensor, "__bool__"),
               (torch.Tensor, "__format__"), (torch.Tensor, "register_hook"), (torch.autograd, "grad"),
               (dataloader.DataLoader, "__init__"), (dataloader._BaseDataLoaderIter, "__next__")]
    before = {key: key[0].__dict__.get(key[1]) for key in watched}
    tables = [(module_hooks, "_global_forward_hooks"), (module_hooks, "_global_forward_pre_hooks"),
              (module_hooks, "_global_forward_hooks_with_kwargs"),  # with_kwargs / always_call: newer torches only
              (module_hooks, "_global_forward_hooks_always_called"), (optimizer_hooks, "_global_optimizer_post_hooks")]
    hook_dicts = [getattr(owner, name) for owner, name in tables if hasattr(owner, name)]
    hooks_before = [dict(d) for d in hook_dicts]
    receipt = shims.enable(patches="none", mode="detect")
    assert receipt["patches"]["detect"]["status"] == "applied"
    assert all(key[0].__dict__.get(key[1]) is not before[key] for key in watched)
    assert len(module_hooks._global_forward_hooks) == len(hooks_before[0]) + 1
    shims.disable()
    assert all(key[0].__dict__.get(key[1]) is before[key] for key in watched)
    assert [dict(d) for d in hook_dicts] == hooks_before  # every global hook table as it was
    assert shims.status()["patches"]["detect"]["status"] == "reverted"


@pytest.mark.usefixtures("optimizer_classes_restored")
def test_compiled_training_is_unchanged_and_quiet_in_detect_mode(recwarn):
    """torch.compile traces through modules with global hooks (ours skip themselves while compiling); torch's
    warning about global hooks concerns ours and is not shown; losses and weights are bitwise those of a plain run."""
    assert_compiled_training_unchanged_and_quiet(recwarn)


def test_fix_mode_installs_no_detectors():
    from torch.nn.modules import module as module_hooks
    shims.enable(patches="none", mode="fix")
    assert "detect" not in shims.status()["patches"]
    assert not module_hooks._global_forward_hooks


LWDETR_STYLE_EVALUATE = """
import torch


@torch.no_grad()
def evaluate(model, batches, args):
    model.eval()
    if args.fp16_eval:
        model.half()
    outputs = []
    for images in batches:
        if args.fp16_eval:
            images = images.half()
        outputs.append(model(images).float())
    return outputs
"""


def test_a_cast_that_a_patch_observes_itself_is_not_reported_twice(tmp_path, monkeypatch):
    """The detr patch observes LW-DETR-style evaluate functions (SHIMS_DETR_MODULES) and reports their
    `model.half()`; the generic half-eval check leaves a module where that check is applied to it, and still
    reports the very same code in a module no patch observes."""
    import importlib
    import types
    for name in ("shims_lwdetr_engine", "shims_other_engine"):
        (tmp_path / f"{name}.py").write_text(LWDETR_STYLE_EVALUATE)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    shims.enable(patches=["detr"], mode="detect", options={"SHIMS_DETR_MODULES": "shims_lwdetr_engine"})
    observed = importlib.import_module("shims_lwdetr_engine")
    other = importlib.import_module("shims_other_engine")
    assert shims.status()["patches"]["detr"]["targets"]["shims_lwdetr_engine:evaluate"]["status"] == "applied"
    args = types.SimpleNamespace(fp16_eval=True)
    observed.evaluate(make_bn_mlp(), [torch.randn(3, 4)], args)
    other.evaluate(make_bn_mlp(), [torch.randn(3, 4)], args)
    shims.disable()
    patches = shims.status()["patches"]
    assert len(patches["detr"]["findings"]) == 1  # the detr patch's own report of the observed module
    assert [(f["kind"], f["where"]) for f in patches["detect"]["findings"]] == \
        [("half-eval", f"{tmp_path / 'shims_other_engine.py'}:9")]


def test_a_failing_detector_never_breaks_training(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("detector bug")
    monkeypatch.setattr(forwards.Forwards, "forward_done", broken)
    model, loader, optimizer, scheduler = make_training(batches=3)
    plain_loss, _ = fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)
    model, loader, optimizer, scheduler = make_training(batches=3)
    shims.enable(patches="none", mode="detect")
    loss, _ = fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)
    record = shims.status()["patches"]["detect"]
    shims.disable()
    assert loss == plain_loss  # training ran to the end, and to the same result as without shims
    assert record["targets"]["torch:detectors.forwards"]["status"] == "error"
    assert any("detector bug" in note for note in record["notes"])


def test_a_failing_detector_raises_in_strict_mode(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("detector bug")
    monkeypatch.setattr(forwards.Forwards, "forward_done", broken)
    model, loader, optimizer, scheduler = make_training(batches=2)
    shims.enable(patches="none", mode="detect", strict=True)
    with pytest.raises(RuntimeError, match="detector bug"):
        fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)


def test_findings_have_exactly_the_documented_keys():
    model, loader, optimizer, scheduler = make_training(batches=2)
    findings = observe(fit_one_epoch_buggy, model, loader, batch_transforms, optimizer, scheduler)
    assert findings
    for finding in findings:
        assert set(finding) >= {"kind", "message", "where", "count", "cost", "fix", "per", "basis", "seconds_each",
                                "seconds_per_step", "step_share", "bytes"}
        assert set(finding) <= {"kind", "message", "where", "count", "cost", "fix", "per", "basis", "seconds_each",
                                "seconds_per_step", "step_share", "bytes", "seconds_once", "alternative",
                                "framework", "framework_version", "user_where"}
        assert finding["kind"] in detect.KINDS
        assert isinstance(finding["count"], int) and finding["count"] >= 1
        path, _, line = finding["where"].rpartition(":")
        assert path and line.isdigit()
