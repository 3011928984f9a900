"""gradhooks (shims.patches.colossalai): reduction hooks fire once per accumulated gradient, never for autograd.grad.

Each test drives real autograd (CPU) and checks what a gradient reducer cares about: how many times the hook ran, on
which gradient, and what torch.autograd.grad callers get back. The property test replays random sequences of
autograd.grad / backward / retain_graph calls against a model of the documented semantics.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shims.patches.colossalai import gradhooks


def leaf(values=(1.0, 2.0, 3.0)):
    return torch.nn.Parameter(torch.tensor(values))


# ---------------------------------------------------------------- register_reduction_hook


def test_reduction_hook_skips_autograd_grad_and_fires_once_per_backward_on_the_accumulated_grad():
    w = leaf()
    seen = []
    gradhooks.register_reduction_hook(w, lambda p: seen.append(p.grad.clone()))
    y = (w * w).sum()  # w used twice in one graph: still one call
    (g,) = torch.autograd.grad(y, w, retain_graph=True)
    assert seen == [] and w.grad is None
    assert torch.equal(g, 2 * w.detach())
    y.backward(retain_graph=True)
    y.backward()
    assert len(seen) == 2
    assert torch.equal(seen[0], 2 * w.detach()) and torch.equal(seen[1], 4 * w.detach())  # sees the running sum


def test_reduction_hook_can_take_the_gradient_and_is_removable():
    w = leaf()
    taken = []

    def take(p):
        taken.append(p.grad)
        p.grad = None

    handle = gradhooks.register_reduction_hook(w, take)
    (3 * w).sum().backward()
    assert w.grad is None and torch.equal(taken[0], torch.full((3,), 3.0))
    handle.remove()
    handle.remove()  # idempotent
    (3 * w).sum().backward()
    assert len(taken) == 1 and torch.equal(w.grad, torch.full((3,), 3.0))


def test_backward_with_other_inputs_does_not_fire():
    w, v = leaf(), leaf()
    fired = []
    with gradhooks.register_reduction_hooks([w, v], lambda p: fired.append(p)) as handle:
        assert len(handle) == 2
        (w * v).sum().backward(inputs=[v])
        assert len(fired) == 1 and fired[0] is v
    (w * v).sum().backward()
    assert len(fired) == 1  # removed by the context manager


def test_register_reduction_hooks_leaves_frozen_parameters_out():
    w, frozen = leaf(), torch.nn.Parameter(torch.ones(3), requires_grad=False)
    assert len(gradhooks.register_reduction_hooks([w, frozen], lambda p: None)) == 1


@pytest.mark.parametrize("bad, error, words", [
    (torch.ones(3, requires_grad=True) * 2, ValueError, "is_leaf=False"),
    (torch.ones(3), ValueError, "requires_grad=False"),
    ([1.0, 2.0], TypeError, "got list"),
])
def test_bad_parameters_get_a_clear_error(bad, error, words):
    with pytest.raises(error, match=words):
        gradhooks.register_reduction_hook(bad, lambda p: None)
    with pytest.raises(error, match=words):
        gradhooks.defer_until_accumulated(bad, lambda p: None)


def test_a_hook_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="callable"):
        gradhooks.register_reduction_hook(leaf(), "reduce")


# ---------------------------------------------------------------- defer_until_accumulated


def deferring(w, runs, fired=None):
    """A tensor hook on w that defers its work; the gradient passes through untouched (returns None)."""

    def tensor_hook(grad):
        if fired is not None:
            fired.append(grad)
        gradhooks.defer_until_accumulated(w, lambda p: runs.append(p.grad.clone()))

    return w.register_hook(tensor_hook)


def test_deferred_work_runs_in_backward_only_and_autograd_grad_gets_the_real_gradient():
    w = leaf()
    runs, fired = [], []
    deferring(w, runs, fired)
    y = (w ** 2).sum()
    (g1,) = torch.autograd.grad(y, w, retain_graph=True)
    (g2,) = torch.autograd.grad(y, w, retain_graph=True)  # taming-transformers calls it twice per step
    assert runs == [] and len(fired) == 2
    assert torch.equal(g1, 2 * w.detach()) and torch.equal(g2, g1)
    y.backward()
    assert len(runs) == 1 and torch.equal(runs[0], 2 * w.detach()) and len(fired) == 3


def test_deferred_work_stops_when_the_tensor_hook_is_removed():
    w = leaf()
    runs = []
    handle = deferring(w, runs)
    (2 * w).sum().backward()
    handle.remove()
    (2 * w).sum().backward()
    assert len(runs) == 1


def test_clear_deferred_drops_pending_work():
    w = leaf()
    runs = []
    deferring(w, runs)
    gradhooks.clear_deferred(w)
    (2 * w).sum().backward()  # the tensor hook re-arms a new gate: the work runs
    assert len(runs) == 1
    y = (2 * w).sum()
    torch.autograd.grad(y, w, retain_graph=True)  # armed by a phantom firing...
    gradhooks.clear_deferred(w)  # ...then cleared: nothing left over
    gradhooks.clear_deferred(w)  # no effect the second time
    assert len(runs) == 1


def test_backward_on_other_threads_keeps_each_parameter_once_per_backward():
    """Autograd may run hooks on threads other than the caller's: matching is by graph task, not thread."""
    params = [leaf() for _ in range(4)]
    runs = {id(p): [] for p in params}
    for p in params:
        deferring(p, runs[id(p)])
    errors = []

    def train(p):
        try:
            for _ in range(20):
                y = (p ** 3).sum()
                torch.autograd.grad(y, p, retain_graph=True)
                p.grad = None
                y.backward()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(p,)) for p in params]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    for p in params:
        assert len(runs[id(p)]) == 20
        assert all(torch.equal(g, 3 * p.detach() ** 2) for g in runs[id(p)])


def test_a_collected_parameter_leaves_nothing_behind():
    if gradhooks.post_accumulate_mechanism() != "post-accumulate-grad hook":
        pytest.skip("torch < 2.1: the accumulator node hook keeps a hooked parameter alive until the hook is removed; "
                    "test_gradhooks_accumulator_node.py::test_removing_the_hook_releases_the_parameter checks that")
    w = leaf()
    deferring(w, [])
    (2 * w).sum().backward()
    key = id(w)
    assert key in gradhooks._GATES
    del w
    gc.collect()
    assert key not in gradhooks._GATES


CALLS = st.lists(st.sampled_from(["grad", "grad_other", "backward", "backward_retain", "backward_other"]),
                 min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(CALLS)
def test_random_call_sequences_follow_the_documented_semantics(calls):
    """tensor hook: once per call that reaches w; deferred work and reduction hook: once per backward reaching w,
    seeing the gradient accumulated so far; autograd.grad never touches w.grad."""
    w, v = leaf(), leaf((0.5, -1.0, 2.0))
    runs, fired, reduced = [], [], []
    deferring(w, runs, fired)
    gradhooks.register_reduction_hook(w, lambda p: reduced.append(p.grad.clone()))
    y = (w * w * v).sum()
    expected_grad, accumulated, reached, backwards = 2 * w.detach() * v.detach(), None, 0, 0
    for call in calls:
        if call == "grad":
            (g,) = torch.autograd.grad(y, w, retain_graph=True)
            assert torch.equal(g, expected_grad)
            reached += 1
        elif call == "grad_other":
            torch.autograd.grad(y, v, retain_graph=True)
        elif call in ("backward", "backward_retain"):
            y.backward(retain_graph=True)
            accumulated = expected_grad.clone() if accumulated is None else accumulated + expected_grad
            reached += 1
            backwards += 1
        else:
            y.backward(inputs=[v], retain_graph=True)
        if accumulated is None:
            assert w.grad is None
    assert len(fired) == reached
    assert len(runs) == backwards and len(reduced) == backwards
    if backwards:
        assert torch.equal(runs[-1], accumulated) and torch.equal(reduced[-1], accumulated)


# ---------------------------------------------------------------- GradHookAudit


def audited(w, audit, copies=1):
    for _ in range(copies):
        w.register_hook(lambda grad: audit.fired(w))


def test_audit_counts_firings_outside_backward_before_the_backward_ends():
    reports = []
    audit = gradhooks.GradHookAudit(on_outside_backward=lambda p, n: reports.append(n))
    w = leaf()
    audited(w, audit)
    y = (w * w).sum()
    torch.autograd.grad(y, w, retain_graph=True)
    torch.autograd.grad(y, w, retain_graph=True)
    assert audit.counts["outside_backward"] == 1  # the first is known to be a phantom once the second fires
    y.backward()
    assert audit.counts == {"fired": 3, "accumulated": 1, "outside_backward": 2, "repeated_in_backward": 0}
    assert sum(reports) == 2


def test_audit_counts_a_hook_registered_twice():
    repeats = []
    audit = gradhooks.GradHookAudit(on_repeated=lambda p, n: repeats.append(n))
    w = leaf()
    audited(w, audit, copies=2)
    (2 * w).sum().backward()
    (2 * w).sum().backward()
    assert audit.counts == {"fired": 4, "accumulated": 2, "outside_backward": 0, "repeated_in_backward": 2}
    assert repeats == [1, 1]
    audit.remove()
    (2 * w).sum().backward()
    assert audit.counts["accumulated"] == 2  # its post-accumulate-grad hooks are gone


def test_graph_task_id_is_negative_outside_backward_and_shared_by_one_backwards_hooks():
    if not hasattr(torch._C, "_current_graph_task_id"):  # asked of torch, not of the function under test
        pytest.skip("this torch has no torch._C._current_graph_task_id; matching falls back to the latest firing")
    w = leaf()
    ids = []
    w.register_hook(lambda grad: ids.append(gradhooks.graph_task_id()))
    # shims' reduction hook: post-accumulate-grad where torch has it (2.1+), the accumulator node's hook before
    gradhooks.register_reduction_hook(w, lambda p: ids.append(gradhooks.graph_task_id()))
    assert gradhooks.graph_task_id() in (-1, None)
    (2 * w).sum().backward()
    (2 * w).sum().backward()
    assert len(ids) == 4 and None not in ids, ids
    assert ids[0] == ids[1] != ids[2] == ids[3]
