"""colossalai patch: gradient-reduction hooks fire once per accumulated gradient, never for torch.autograd.grad.

ColossalAI itself cannot run here (LowLevelZero needs CUDA/NPU, colossalai 0.5.0 pins torch <= 2.5.1), so the
references in tests/patches/colossalai/reference are written here with upstream's structure and method names, and
loaded under ColossalAI's module names so that the patch's real targets find them. (test_colossalai_real.py runs the
real 0.3.6 / 0.3.7 LowLevelZeroOptimizer on CPU when its sdist can be fetched; test_colossalai_distributed.py trains
on 2 gloo ranks against a single-process reference, bitwise.)
"""

from __future__ import annotations

import pytest
import torch

import shims
from tests.conftest import write
from shims import versions
from shims.errors import ShimsPatchError
from tests.patches.colossalai import reference as ref
from tests.patches.colossalai.reference import vqgan

LOW_LEVEL = "colossalai.zero.low_level.low_level_optim"
GEMINI = "colossalai.zero.gemini.gemini_ddp"
ATTACH = f"{LOW_LEVEL}:LowLevelZeroOptimizer._attach_reduction_hook"
ZERO_GRAD = f"{LOW_LEVEL}:LowLevelZeroOptimizer.zero_grad"
GEMINI_HOOK = f"{GEMINI}:GeminiDDP.grad_handle"


@pytest.fixture
def upstream():
    """Fresh reference modules under ColossalAI's names; removed afterwards."""
    modules = ref.install_as_upstream()
    yield modules
    shims.disable()
    ref.uninstall_upstream()


def receipt():
    return shims.status()["patches"]["colossalai"]


def enable(mode="fix", **kwargs):
    return shims.enable(patches=["colossalai"], mode=mode, **kwargs)


def low_level(module, model, **kwargs):
    kwargs.setdefault("partition_grad", True)
    kwargs.setdefault("reduce_bucket_size", 40)
    return module.LowLevelZeroOptimizer(vqgan.make_inner_optimizer(list(model.parameters())), **kwargs)


def vqgan_step(model, x, zero, forward=None):
    """One taming-style step: two autograd.grad calls on the last layer, then the wrapper's backward and step.
    Returns the gradient the first autograd.grad call handed back."""
    reconstruction = (forward or model)(x)
    nll = (x - reconstruction).abs().mean()
    g_loss = -model.discriminator(reconstruction).mean()
    nll_grads = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
    d_weight = vqgan.adaptive_weight(nll, g_loss, model.last_layer)
    zero.backward(nll + d_weight * g_loss)
    zero.step()
    return nll_grads


# ---------------------------------------------------------------- applying, versions, fingerprints


def test_applies_to_all_three_targets_and_reverts_to_the_originals(upstream):
    llz, gemini = upstream["low_level_optim"].LowLevelZeroOptimizer, upstream["gemini_ddp"].GeminiDDP
    originals = (llz.__dict__["_attach_reduction_hook"], llz.__dict__["zero_grad"], gemini.__dict__["grad_handle"])
    enable()
    targets = receipt()["targets"]
    assert {k: v["status"] for k, v in targets.items()} == {ATTACH: "applied", ZERO_GRAD: "applied",
                                                            GEMINI_HOOK: "applied"}
    assert llz.__dict__["_attach_reduction_hook"] is not originals[0]
    assert isinstance(gemini.__dict__["grad_handle"], staticmethod)  # stays a staticmethod, as upstream declares it
    shims.disable()
    assert (llz.__dict__["_attach_reduction_hook"], llz.__dict__["zero_grad"],
            gemini.__dict__["grad_handle"]) == originals
    assert all(t["status"] == "reverted" for t in receipt()["targets"].values())


@pytest.mark.parametrize("version, low_level_status", [
    ("0.3.6", "applied"), ("0.3.1", "applied"), ("0.3.7", "fixed-upstream"), ("0.5.0", "fixed-upstream"),
    ("0.3.0", "skipped"), ("0.2.8", "skipped")])
def test_low_level_zero_versions_and_gemini_in_every_version(upstream, monkeypatch, version, low_level_status):
    monkeypatch.setattr(versions, "installed", lambda name: version if name == "colossalai" else None)
    enable()
    targets = receipt()["targets"]
    assert targets[ATTACH]["status"] == low_level_status, targets[ATTACH]["reason"]
    assert targets[ZERO_GRAD]["status"] == low_level_status
    assert targets[GEMINI_HOOK]["status"] == "applied"  # GeminiDDP still uses a tensor hook in 0.5.0
    if low_level_status == "fixed-upstream":
        assert "0.3.7" in targets[ATTACH]["reason"]


UPSTREAM_FIXED_LOW_LEVEL = '''
import torch
from functools import partial


class LowLevelZeroOptimizer:
    """The 0.3.7 shape (PR #5596): post-accumulate-grad hooks, zero_grad resets the bucket store."""

    def _grad_handler(self, group_id, param):
        if self.require_grad_sync:
            self._add_to_bucket(param, group_id)

    def _attach_reduction_hook(self):
        for group_id in range(self.num_param_groups):
            for param in self._working_param_groups[group_id]:
                param.register_post_accumulate_grad_hook(partial(self._grad_handler, group_id))

    def zero_grad(self, set_to_none=True):
        self._bucket_store.reset_all()
'''

OLDER_LOW_LEVEL = '''
from functools import partial


class LowLevelZeroOptimizer:
    """The 0.3.0 shape: _grad_handler(self, param, grad, reduce_rank)."""

    num_param_groups = 1

    def _grad_handler(self, param, grad, reduce_rank):
        self._add_to_reduction_bucket(param, reduce_rank)
        return grad

    def _add_to_bucket(self, param, group_id):
        pass

    def _attach_reduction_hook(self):
        for param in self._working_param_groups[0]:
            param.register_hook(partial(self._grad_handler, param, reduce_rank=None))

    def zero_grad(self, set_to_none=True):
        pass
'''


def load_as(tmp_path, name, source):
    import importlib.util
    import sys
    path = write(tmp_path / f"{name.replace('.', '_')}.py", source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_fingerprint_says_fixed_upstream_for_the_0_3_7_shape_without_version_metadata(tmp_path, upstream):
    module = load_as(tmp_path, LOW_LEVEL, UPSTREAM_FIXED_LOW_LEVEL)
    original = module.LowLevelZeroOptimizer.__dict__["_attach_reduction_hook"]
    enable(strict=True)  # fixed-upstream never raises, even in strict mode
    targets = receipt()["targets"]
    assert targets[ATTACH]["status"] == "fixed-upstream" and "PR #5596" in targets[ATTACH]["reason"]
    assert targets[ZERO_GRAD]["status"] == "fixed-upstream"
    assert module.LowLevelZeroOptimizer.__dict__["_attach_reduction_hook"] is original


def test_fingerprint_refuses_another_shape_and_strict_mode_raises(tmp_path, upstream):
    module = load_as(tmp_path, LOW_LEVEL, OLDER_LOW_LEVEL)
    original = module.LowLevelZeroOptimizer.__dict__["_attach_reduction_hook"]
    enable()
    target = receipt()["targets"][ATTACH]
    assert target["status"] == "skipped" and "_grad_handler" in target["reason"]
    assert module.LowLevelZeroOptimizer.__dict__["_attach_reduction_hook"] is original
    shims.disable()
    from shims import engine
    engine.reset()
    with pytest.raises(ShimsPatchError, match="_grad_handler"):
        enable(strict=True)


# ---------------------------------------------------------------- LowLevelZero, in one process (world size 1)


def test_low_level_zero_unpatched_crashes_on_the_vqgan_loss(upstream):
    model = vqgan.build_model()
    zero = low_level(upstream["low_level_optim"], model)
    x = vqgan.batches(1, 1, 1)[0][0][0]
    with pytest.raises(AttributeError, match="NoneType"):
        vqgan_step(model, x, zero)


def test_low_level_zero_patched_queues_each_parameter_once_per_backward(upstream):
    enable()
    model = vqgan.build_model()
    zero = low_level(upstream["low_level_optim"], model)
    n_params = len(list(model.parameters()))
    for x in [step[0][0] for step in vqgan.batches(3, 1, 1)]:
        before = zero.queued_for_reduction
        vqgan_step(model, x, zero)
        assert zero.queued_for_reduction - before == n_params
    assert receipt()["counters"]["post_accumulate_hooks_attached"] == n_params
    assert receipt()["counters"]["post_accumulate_hook_calls"] == 3 * n_params


def test_zero_grad_empties_what_a_plain_backward_queued(upstream):
    """PR #5596 also resets the bucket store in zero_grad(): entries queued by a loss.backward() that bypassed the
    optimizer would otherwise be flushed after zero_grad() set their .grad to None."""
    model = vqgan.build_model()
    x = vqgan.batches(1, 1, 1)[0][0][0]

    def queue_then_zero_grad(zero):
        vqgan.generator_loss(model, x, use_adaptive_weight=False)[0].backward()  # not zero.backward: no flush
        queued = zero._bucket_store.num_elements_in_bucket()
        zero.zero_grad()
        return queued

    unpatched = low_level(upstream["low_level_optim"], model, reduce_bucket_size=10_000)
    assert queue_then_zero_grad(unpatched) > 0
    with pytest.raises(AttributeError, match="NoneType"):
        unpatched.backward(vqgan.generator_loss(model, x, use_adaptive_weight=False)[0])
    unpatched.zero_grad()

    fresh = ref.install_as_upstream()["low_level_optim"]
    enable()
    model = vqgan.build_model()  # the unpatched optimizer's tensor hooks stay on the first model's parameters
    patched = low_level(fresh, model, reduce_bucket_size=10_000)
    assert queue_then_zero_grad(patched) > 0
    assert patched._bucket_store.num_elements_in_bucket() == 0
    patched.backward(vqgan.generator_loss(model, x, use_adaptive_weight=False)[0])
    assert patched.queued_for_reduction == len(list(model.parameters()))


def test_registration_failure_falls_back_to_upstream_hooks_and_says_so(upstream, monkeypatch):
    from shims.patches.colossalai import gradhooks

    def refuse(param, hook):
        raise RuntimeError("no hooks today")

    monkeypatch.setattr(gradhooks, "register_reduction_hook", refuse)
    enable()
    model = vqgan.build_model()
    zero = low_level(upstream["low_level_optim"], model)
    zero.backward(vqgan.generator_loss(model, vqgan.batches(1, 1, 1)[0][0][0], use_adaptive_weight=False)[0])
    assert zero.queued_for_reduction == len(list(model.parameters()))  # upstream's tensor hooks did the work
    rec = receipt()
    assert rec["counters"]["fallbacks_to_tensor_hooks"] == 1
    assert any("no hooks today" in note for note in rec["notes"])
    shims.disable()
    from shims import engine
    engine.reset()
    fresh = ref.install_as_upstream()["low_level_optim"]  # before enable: the patch finds modules already there
    enable(strict=True)
    with pytest.raises(RuntimeError, match="no hooks today"):
        low_level(fresh, vqgan.build_model())


# ---------------------------------------------------------------- Gemini, in one process


def test_gemini_autograd_grad_gets_the_real_gradient_and_reduces_nothing(upstream):
    enable()
    gemini = upstream["gemini_ddp"]
    model, plain = vqgan.build_model(), vqgan.build_model()
    ddp = gemini.GeminiDDP(model)
    x = vqgan.batches(1, 1, 1)[0][0][0]

    def loss_and_nll_grad(m, forward):
        reconstruction = forward(x)
        nll = (x - reconstruction).abs().mean()
        loss = nll - 0.1 * m.discriminator(reconstruction).mean()
        return loss, torch.autograd.grad(nll, m.last_layer, retain_graph=True)[0]

    loss, got = loss_and_nll_grad(model, ddp)
    _, expected = loss_and_nll_grad(plain, plain)
    assert torch.equal(got, expected)
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # not a freed tensor
    assert ddp.chunk_manager.params_reduced == 0 and model.last_layer.grad is None
    ddp.backward(loss)
    assert ddp.chunk_manager.params_reduced == len(list(model.parameters()))
    assert ddp.chunk_manager.reductions == 1
    assert all(p.grad is None for p in model.parameters())


def test_gemini_unpatched_hook_raises_under_autograd_grad(upstream):
    model = vqgan.build_model()
    ddp = upstream["gemini_ddp"].GeminiDDP(model)
    x = vqgan.batches(1, 1, 1)[0][0][0]
    with pytest.raises(RuntimeError, match="failed at the gradient reduction"):
        vqgan_step(model, x, upstream["gemini_ddp"].GeminiOptimizer(torch.optim.SGD(model.parameters(), 0.1), ddp),
                   forward=ddp)


def test_gemini_hooks_removed_upstream_style_leave_no_deferred_work(upstream):
    enable()
    model = vqgan.build_model()
    ddp = upstream["gemini_ddp"].GeminiDDP(model)
    x = vqgan.batches(1, 1, 1)[0][0][0]
    ddp.backward(vqgan.generator_loss(model, x, use_adaptive_weight=False)[0])
    reduced = ddp.chunk_manager.params_reduced
    ddp.remove_hooks()
    vqgan.generator_loss(model, x, use_adaptive_weight=False)[0].backward()
    assert ddp.chunk_manager.params_reduced == reduced  # no reduction without Gemini's hook
    assert all(p.grad is not None for p in model.parameters())  # an ordinary backward again


def test_gemini_deferral_failure_falls_back_to_upstream_hook_and_says_so(upstream, monkeypatch):
    from shims.patches.colossalai import gradhooks

    def refuse(param, work):
        raise RuntimeError("cannot defer")

    monkeypatch.setattr(gradhooks, "defer_until_accumulated", refuse)
    enable()
    model = vqgan.build_model()
    ddp = upstream["gemini_ddp"].GeminiDDP(model)
    ddp.backward(vqgan.generator_loss(model, vqgan.batches(1, 1, 1)[0][0][0], use_adaptive_weight=False)[0])
    n_params = len(list(model.parameters()))
    assert ddp.chunk_manager.params_reduced == n_params  # upstream's hook did the reduction
    rec = receipt()
    assert rec["counters"]["fallbacks_to_tensor_hook"] == n_params
    assert any("cannot defer" in note for note in rec["notes"])


OLD_STYLE_GEMINI = '''
import torch
from functools import partial
from torch import nn


class GeminiDDP(nn.Module):
    """The 0.3.x shape: an instance method grad_handle(self, p, grad), registered as partial(self.grad_handle, p)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.reduced = []
        for p in module.parameters():
            p.register_hook(partial(self.grad_handle, p))

    def grad_handle(self, p, grad):
        self.reduced.append((p, grad.clone()))
        empty_grad = torch.empty_like(grad)
        empty_grad.untyped_storage().resize_(0)
        return empty_grad
'''


def test_gemini_instance_method_shape_of_0_3_is_deferred_too(tmp_path, upstream):
    module = load_as(tmp_path, GEMINI, OLD_STYLE_GEMINI)
    enable()
    assert receipt()["targets"][GEMINI_HOOK]["status"] == "applied"
    model = vqgan.build_model()
    ddp = module.GeminiDDP(model)
    x = vqgan.batches(1, 1, 1)[0][0][0]
    loss = vqgan.generator_loss(model, x, use_adaptive_weight=False)[0]
    got = torch.autograd.grad(loss, model.last_layer, retain_graph=True)[0]
    assert got.untyped_storage().nbytes() > 0 and ddp.reduced == []
    loss.backward()
    assert sorted(id(p) for p, _ in ddp.reduced) == sorted(id(p) for p in model.parameters())  # each once
    last = dict((id(p), g) for p, g in ddp.reduced)[id(model.last_layer)]
    assert last.untyped_storage().nbytes() > 0  # a freed gradient (storage resized to 0) crashes torch 2.0's repr
    assert torch.equal(last, got)  # the handler got the accumulated gradient, equal to this backward's


# ---------------------------------------------------------------- detect mode


def test_detect_counts_autograd_grad_firings_and_changes_nothing(upstream):
    """Phantom firings inside no_sync() are harmless upstream (nothing is queued), so the run completes: detect mode
    must count them (2 per step) and leave the parameters bitwise equal to a run without shims."""
    data = vqgan.batches(3, 2, 1)

    def train(module):
        model = vqgan.build_model()
        zero = low_level(module, model, partition_grad=False, overlap_communication=True)
        for step in data:
            with zero.no_sync():
                micro = step[0][0]
                reconstruction = model(micro)
                nll = (micro - reconstruction).abs().mean()
                g_loss = -model.discriminator(reconstruction).mean()
                d_weight = vqgan.adaptive_weight(nll, g_loss, model.last_layer)
                zero.backward((nll + d_weight * g_loss) / 2)
            zero.backward(vqgan.generator_loss(model, step[1][0], use_adaptive_weight=False)[0] / 2)
            zero.step()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    without = train(upstream["low_level_optim"])
    fresh = ref.install_as_upstream()["low_level_optim"]
    enable(mode="detect")
    observed = train(fresh)
    assert all(torch.equal(without[k], observed[k]) for k in without)
    rec = receipt()
    assert rec["counters"]["hook_calls_outside_backward"] == 2 * len(data)
    kinds = {f["kind"]: f for f in rec["findings"]}
    assert kinds["hook-outside-backward"]["count"] == 2 * len(data)
    assert "#5601" in kinds["hook-outside-backward"]["message"]
    assert "low_level_optim.py:" in kinds["hook-outside-backward"]["where"]  # points at _attach_reduction_hook


def test_detect_reports_a_hook_attached_twice(upstream):
    enable(mode="detect")
    model = vqgan.build_model()
    zero = low_level(upstream["low_level_optim"], model, reduce_bucket_size=10_000)
    zero._attach_reduction_hook()  # a second set of hooks: every parameter is queued twice per backward
    with pytest.raises(AttributeError, match="NoneType"):
        zero.backward(vqgan.generator_loss(model, vqgan.batches(1, 1, 1)[0][0][0], use_adaptive_weight=False)[0])
    kinds = {f["kind"]: f for f in receipt()["findings"]}
    assert kinds["hook-repeated-in-backward"]["count"] == len(list(model.parameters()))
    assert "hook-outside-backward" not in kinds  # no autograd.grad here: nothing else to report


def test_detect_on_gemini_reports_the_hook_that_raised(upstream):
    enable(mode="detect")
    model = vqgan.build_model()
    ddp = upstream["gemini_ddp"].GeminiDDP(model)
    loss = vqgan.generator_loss(model, vqgan.batches(1, 1, 1)[0][0][0], use_adaptive_weight=False)[0]
    with pytest.raises(RuntimeError, match="failed at the gradient reduction"):
        torch.autograd.grad(loss, model.last_layer, retain_graph=True)
    finding = {f["kind"]: f for f in receipt()["findings"]}["hook-raised"]
    assert "GeminiDDP.grad_handle" in finding["message"] and "gemini_ddp.py:" in finding["where"]
