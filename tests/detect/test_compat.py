"""Detect mode on torches that lack newer APIs (supported: torch 2.0 to the newest). Each missing API is simulated
here by taking it away on whatever torch runs the tests; the same tests run unchanged on the old torches themselves.

- torch.compiler.is_compiling (absent in 2.0-2.2): torch._dynamo.is_compiling instead, bound when torch._dynamo is
  imported; compiled training stays bitwise identical and quiet.
- with_kwargs= / always_call= of global forward hooks (2.0 has neither; 2.2-2.5 always_call only): a hook without
  kwargs, and the session's own reset of its nesting depth after a forward that raised; the receipt notes the limits.
- torch._C._current_graph_task_id (what tells autograd's re-run forwards and one backward from the next): the
  detectors that need it are refused, with the reason in the receipt and in the table; the others keep working.
"""

from __future__ import annotations

import pytest
import torch

import shims
from shims.detect import compat, report
from tests.conftest import clean_env, run_python, write
from tests.detect.conftest import (assert_compiled_training_unchanged_and_quiet, batch_transforms,
                                   fit_one_epoch_buggy, line_of, make_bn_mlp, make_training, observe)


@pytest.fixture
def torch_2_0_forward_hooks(monkeypatch):
    """Global forward hooks and is_compiling as torch 2.0 has them: register_module_forward_hook(hook) only, and no
    torch.compiler.is_compiling (taken away at the one place detect mode asks for it: dynamo imports it too)."""
    from torch.nn.modules import module as module_hooks
    newest = module_hooks.register_module_forward_hook

    def register_module_forward_hook(hook):
        return newest(hook)
    monkeypatch.setattr(module_hooks, "register_module_forward_hook", register_module_forward_hook)
    monkeypatch.setattr(compat, "compiler_is_compiling", lambda torch: None)


def test_old_forward_hooks_find_the_stray_forward_also_after_a_forward_that_raised(torch_2_0_forward_hooks):
    """Without always_call, a forward that raises never calls the post-hook: the session must not take every later
    forward for a nested one (it would find nothing)."""
    model, loader, optimizer, scheduler = make_training(batches=4)

    def run():
        try:
            model(torch.randn(2, 3, 8, 16))  # 3 channels for a 1-channel model: raises inside the first conv
        except RuntimeError:
            pass
        fit_one_epoch_buggy(model, loader, batch_transforms, optimizer, scheduler)
    findings = observe(run)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("unused-forward", line_of("stray forward"), 4)]
    notes = shims.status()["patches"]["detect"]["notes"]
    assert any("without kwargs" in note for note in notes)
    assert any("without always_call" in note for note in notes)


def test_old_forward_hooks_see_the_evaluation_with_grad(torch_2_0_forward_hooks):
    model, loader, _, _ = make_training(batches=3)

    def evaluate():
        model.eval()
        for images, _ in loader:
            model(images)
    findings = observe(evaluate)
    assert [(f["kind"], f["count"]) for f in findings] == [("eval-with-grad", 3)]


@pytest.mark.usefixtures("optimizer_classes_restored")
def test_compiled_training_without_torch_compiler_is_compiling_is_unchanged_and_quiet(torch_2_0_forward_hooks,
                                                                                      recwarn):
    assert_compiled_training_unchanged_and_quiet(recwarn)


def test_is_compiling_is_bound_when_torch_dynamo_is_imported_after_detect_mode_started(tmp_path):
    """torch 2.0-2.2: torch._dynamo (0.7 s to import) is not imported by detect mode; its is_compiling is bound the
    moment something else imports it (torch.compile), before anything can be traced."""
    script = write(tmp_path / "late_dynamo.py", """
        import sys
        import torch
        import shims
        from shims.detect import compat
        compat.compiler_is_compiling = lambda torch: None  # as on torch 2.0-2.2
        shims.enable(patches="none", mode="detect")
        from shims import detect
        session = detect._CURRENT
        print("dynamo imported before:", "torch._dynamo" in sys.modules, "compiling:", session.compiling())
        torch.manual_seed(0)
        model = torch.compile(torch.nn.Linear(4, 2), backend="eager")
        model(torch.randn(3, 4)).sum().backward()
        import torch._dynamo
        print("bound to torch._dynamo.is_compiling:", session._compiling is torch._dynamo.is_compiling)
    """)
    proc = run_python([script], env=clean_env(), cwd=tmp_path, timeout=240)
    assert proc.stdout.splitlines() == ["dynamo imported before: False compiling: False",
                                        "bound to torch._dynamo.is_compiling: True"]


def test_a_detector_whose_mechanism_is_missing_is_refused_with_the_reason(monkeypatch):
    """Without torch._C._current_graph_task_id, forwards run by autograd itself cannot be told from the user's, nor
    one backward from the next: the forwards and hooks detectors are refused (never a silent "no findings"), the
    others still report, and the doctor table says what could not be observed."""
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    model = make_bn_mlp()

    def evaluate_fp16():
        model.eval()
        model.half()  # cast while refused
        with torch.no_grad():
            model(torch.randn(3, 4).half())
    findings = observe(evaluate_fp16)
    assert [(f["kind"], f["count"]) for f in findings] == [("half-eval", 1)]
    receipt = shims.status()
    targets = receipt["patches"]["detect"]["targets"]
    for name, kinds in (("forwards", "unused-forward, eval-with-grad"),
                        ("hooks", "hook-in-autograd-grad, hook-fired-twice")):
        assert targets[f"torch:detectors.{name}"]["status"] == "skipped"
        reason = targets[f"torch:detectors.{name}"]["reason"]
        assert f"refused ({kinds})" in reason and "_current_graph_task_id" in reason
        assert torch.__version__ in reason
    table = "\n".join(report.format_table(receipt))
    assert "shims could not observe everything:" in table
    assert "detect: torch:detectors.forwards: refused (unused-forward, eval-with-grad): torch " in table


def test_compat_names_exactly_what_is_missing(monkeypatch):
    api = compat.TorchAPI(torch)
    assert api.missing("graph_task_id", "node_prehooks", "step_hooks") is None
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    reason = compat.TorchAPI(torch).missing("graph_task_id", "node_prehooks")
    assert reason == f"torch {torch.__version__} has no torch._C._current_graph_task_id (which backward is running)"
