"""Gradient-reduction hooks that fire exactly once per accumulated gradient, for any framework.

A data-parallel optimizer (ZeRO, bucketed all-reduce, sharded gradients) wants to hear "this parameter's gradient is
ready" once per backward. `Tensor.register_hook` is the wrong signal: it also fires for `torch.autograd.grad(y, param)`,
which never writes `param.grad` (VQGAN's adaptive loss weight calls it twice per step; ColossalAI #5601), and it fires
before accumulation, with this backward's contribution only. `Tensor.register_post_accumulate_grad_hook` (torch >= 2.1)
is the right one. What each hook does (produced by benchmarks/hook_semantics.py, torch 2.14.1):

    call                                   tensor hook (register_hook)       post-accumulate-grad hook
    torch.autograd.grad(y, w)              fires; w.grad stays None          does not fire
    y.backward()                           fires once, sees this backward    fires once, after w.grad is updated
    backward twice (retain_graph=True)     fires once per backward           fires once per backward, sees the sum
    w used twice in one graph              fires once (summed gradient)      fires once
    backward(inputs=[other]) without w     does not fire                     does not fire

API
    register_reduction_hook(param, hook) -> ReductionHookHandle
        `hook(param)` runs once per backward that accumulates into `param.grad`, after the accumulation, and never
        for torch.autograd.grad. `param.grad` holds the accumulated gradient (set it to None to take it).
    register_reduction_hooks(params, hook) -> ReductionHookHandle      the same for many parameters, one handle
    defer_until_accumulated(param, work)
        For code that must keep a tensor hook (its registration is not yours to change): call this from the tensor
        hook and let the gradient pass through untouched. `work(param)` then runs right after the same backward
        accumulates `param.grad`; when the firing came from torch.autograd.grad nothing accumulates and `work` is
        dropped. The colossalai patch runs Gemini's reduction this way.
    GradHookAudit(on_outside_backward=None, on_repeated=None)
        Observe-only: call `audit.fired(param)` wherever a tensor hook fires; it counts firings that no accumulation
        followed (torch.autograd.grad) and firings repeated within one backward (a hook registered twice).

On torch 2.0 (no post-accumulate-grad hook) the same signal comes from a post-hook on the parameter's gradient
accumulator node (`AccumulateGrad`), as DeepSpeed and Megatron did before torch 2.1: it runs once per backward, after
`.grad` is updated, and never for torch.autograd.grad (which captures the gradient instead of running that node).
shims keeps the node alive (autograd holds it weakly) until the hook is removed. `post_accumulate_mechanism()` says
which one this torch uses; the receipt of the colossalai patch says it too.

How a firing is matched to its backward: by the autograd graph task (`torch._C._current_graph_task_id()`), never by
thread-local flags, because autograd runs hooks on its own device threads (CUDA), not on the thread that called
backward. A tensor hook and the post-accumulate-grad hook of one backward run in the same graph task, one right after
the other. On a torch without that function, the latest firing before an accumulation is taken as its own.
Docs: docs/patches/colossalai.md.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["register_reduction_hook", "register_reduction_hooks", "defer_until_accumulated", "clear_deferred",
           "GradHookAudit", "ReductionHookHandle", "graph_task_id", "post_accumulate_hook", "post_accumulate_mechanism"]


def graph_task_id():
    """The id of the autograd graph task running on this thread (-1 outside backward), or None if torch lacks it."""
    import torch
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else None


def _check_param(param, what):
    import torch
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{what} needs a torch.Tensor parameter, got {type(param).__name__}")
    if not (param.is_leaf and param.requires_grad):
        raise ValueError(f"{what} needs a leaf tensor with requires_grad=True (a parameter); got a tensor with "
                         f"is_leaf={param.is_leaf}, requires_grad={param.requires_grad}")
    if not hasattr(param, "register_post_accumulate_grad_hook") and post_accumulate_mechanism() is None:
        raise RuntimeError(f"{what} needs Tensor.register_post_accumulate_grad_hook (torch >= 2.1) or hooks on "
                           f"autograd nodes (torch.autograd.graph.Node.register_hook); torch {torch.__version__} "
                           "has neither")


def post_accumulate_mechanism():
    """"post-accumulate-grad hook" (torch >= 2.1), "accumulator node hook" (torch 2.0), or None."""
    import torch
    if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return "post-accumulate-grad hook"
    node = getattr(getattr(torch.autograd, "graph", None), "Node", None)
    if node is not None and hasattr(node, "register_hook"):
        return "accumulator node hook"
    return None


_LIVE_ACCUMULATOR_HOOKS = set()  # autograd keeps AccumulateGrad nodes weakly: a hooked node lives until removed


class _AccumulatorHookHandle:
    """The handle of a hook on a parameter's AccumulateGrad node; keeps the node alive until remove() (the node holds
    its parameter, so a hooked parameter lives until then too, as with DeepSpeed's grad_accs before torch 2.1)."""

    __slots__ = ("node", "handle", "__weakref__")

    def __init__(self, node, handle):
        self.node, self.handle = node, handle
        _LIVE_ACCUMULATOR_HOOKS.add(self)

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
        self.node = self.handle = None
        _LIVE_ACCUMULATOR_HOOKS.discard(self)


def post_accumulate_hook(param, hook):
    """`hook(param)` after each backward accumulates into `param.grad`, never for torch.autograd.grad. Returns a
    handle with remove(). The post-accumulate-grad hook where torch has it, else the accumulator node's post-hook."""
    if hasattr(param, "register_post_accumulate_grad_hook"):
        return param.register_post_accumulate_grad_hook(hook)
    import torch
    import weakref
    with torch.enable_grad():
        node = param.expand_as(param).grad_fn.next_functions[0][0]
    param_ref = weakref.ref(param)  # the node holds the parameter; the hook must not add a second strong path

    def after_accumulation(grad_inputs, grad_outputs):
        live = param_ref()
        if live is not None:
            hook(live)

    return _AccumulatorHookHandle(node, node.register_hook(after_accumulation))


class ReductionHookHandle:
    """Removes the hooks it stands for: `handle.remove()` (idempotent), or use it as a context manager."""

    __slots__ = ("_handles",)

    def __init__(self, handles):
        self._handles = list(handles)

    def remove(self):
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self):
        return len(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def register_reduction_hook(param, hook):
    """Run `hook(param)` once per backward that accumulates into `param.grad`, after the accumulation.

    Never runs for torch.autograd.grad (which writes no `.grad`); a parameter used several times in one graph still
    gets one call. Returns a ReductionHookHandle. Raises ValueError for a tensor that is not a leaf requiring grad.
    """
    _check_param(param, "register_reduction_hook")
    if not callable(hook):
        raise TypeError(f"register_reduction_hook: hook must be callable, got {type(hook).__name__}")
    return ReductionHookHandle([post_accumulate_hook(param, hook)])


def register_reduction_hooks(params, hook):
    """`register_reduction_hook` for each parameter in `params` (those with requires_grad=False are left out)."""
    params = [p for p in params if p.requires_grad]
    for param in params:
        _check_param(param, "register_reduction_hooks")
    if not callable(hook):
        raise TypeError(f"register_reduction_hooks: hook must be callable, got {type(hook).__name__}")
    return ReductionHookHandle([post_accumulate_hook(p, hook) for p in params])


# ---------------------------------------------------------------- deferral: tensor hook -> post-accumulate-grad hook

class _Gate:
    """Per parameter: work armed by tensor-hook firings, keyed by graph task, run by the post-accumulate-grad hook."""

    __slots__ = ("armed", "lock", "handle", "__weakref__")

    def __init__(self):
        self.armed = {}  # graph task id -> work(param)
        self.lock = threading.Lock()
        self.handle = None

    def arm(self, work):
        task = graph_task_id()
        with self.lock:
            if task is None:
                self.armed.clear()  # without task ids the latest firing is the one a following accumulation answers
            self.armed[task] = work

    def on_accumulated(self, param):
        task = graph_task_id()
        with self.lock:
            work = self.armed.pop(task, None)
            self.armed.clear()  # firings of other tasks (torch.autograd.grad) never accumulate: drop their work
        if work is not None:
            work(param)


_GATES = {}  # id(param) -> (weak reference to param, _Gate); the entry goes when the parameter is collected
# reentrant: a collection inside the locked region may run _forget_gate (a weakref callback) on this very thread
_GATES_LOCK = threading.RLock()


def _gate_for(param):
    key = id(param)
    with _GATES_LOCK:
        entry = _GATES.get(key)
        if entry is not None and entry[0]() is param:
            return entry[1]
        gate = _Gate()
        # a weak reference: the hook lives on the parameter, the gate must not keep anything else alive
        gate_ref = weakref.ref(gate)

        def run_deferred(accumulated, gate_ref=gate_ref):
            live = gate_ref()
            if live is not None:
                live.on_accumulated(accumulated)

        gate.handle = post_accumulate_hook(param, run_deferred)
        _GATES[key] = (weakref.ref(param), gate)
        weakref.finalize(param, _forget_gate, key, gate)
        return gate


def _forget_gate(key, gate):
    with _GATES_LOCK:
        entry = _GATES.get(key)
        if entry is not None and entry[1] is gate:
            del _GATES[key]


def defer_until_accumulated(param, work):
    """Call from a tensor hook on `param`: run `work(param)` right after this backward accumulates `param.grad`.

    If the firing came from torch.autograd.grad, nothing accumulates and `work` is dropped (at the parameter's next
    accumulation). `work` must not hold the gradient the tensor hook received: it reads `param.grad` instead.
    Safe from autograd's worker threads. Raises ValueError for a tensor that is not a leaf requiring grad.
    """
    _check_param(param, "defer_until_accumulated")
    _gate_for(param).arm(work)


def clear_deferred(param):
    """Remove the deferral machinery from `param` (pending work is dropped). No effect if there is none."""
    with _GATES_LOCK:
        entry = _GATES.get(id(param))
        if entry is None or entry[0]() is not param:
            return
        del _GATES[id(param)]
    gate = entry[1]
    if gate.handle is not None:
        gate.handle.remove()


# ---------------------------------------------------------------- observe-only audit

class GradHookAudit:
    """Counts how a tensor hook's firings line up with gradient accumulation, changing nothing.

    Call `fired(param)` wherever the observed tensor hook runs. A firing in a graph task where `param.grad` is never
    accumulated is "outside backward" (torch.autograd.grad); a second firing for the same parameter in one backward
    is "repeated". A firing is classified at the parameter's next firing or accumulation, whichever comes first, so
    the report arrives before the observed code goes on to use the phantom. Callbacks get (param, n) and run on
    autograd's threads. `counts` has fired, accumulated, outside_backward, repeated_in_backward.
    """

    def __init__(self, on_outside_backward=None, on_repeated=None):
        self.on_outside_backward, self.on_repeated = on_outside_backward, on_repeated
        self._pending = {}  # id(param) -> [graph task ids of firings not yet matched to an accumulation]
        self._handles = {}  # id(param) -> post-accumulate-grad hook handle
        self._lock = threading.Lock()
        self._removed = False
        self.counts = {"fired": 0, "accumulated": 0, "outside_backward": 0, "repeated_in_backward": 0}

    def fired(self, param):
        task = graph_task_id()
        key = id(param)
        with self._lock:
            if self._removed:
                return
            self.counts["fired"] += 1
            if key not in self._handles:
                self._handles[key] = post_accumulate_hook(param, self._accumulated)
            pending = self._pending.setdefault(key, [])
            stale = [t for t in pending if t != task] if task is not None else list(pending)
            repeated = len(pending) - len(stale)
            if task is not None:
                pending[:] = [t for t in pending if t == task]
            else:
                pending.clear()
            pending.append(task)
            self.counts["outside_backward"] += len(stale)
            self.counts["repeated_in_backward"] += 1 if repeated else 0
        if stale and self.on_outside_backward is not None:
            self.on_outside_backward(param, len(stale))
        if repeated and self.on_repeated is not None:
            self.on_repeated(param, 1)

    def _accumulated(self, param):
        task = graph_task_id()
        with self._lock:
            self.counts["accumulated"] += 1
            pending = self._pending.pop(id(param), [])
            stale = [t for t in pending if t != task] if task is not None else pending[:-1]
            self.counts["outside_backward"] += len(stale)
        if stale and self.on_outside_backward is not None:
            self.on_outside_backward(param, len(stale))

    def remove(self):
        """Stop observing: remove the audit's post-accumulate-grad hooks; later `fired` calls are ignored."""
        with self._lock:
            self._removed = True
            handles, self._handles = list(self._handles.values()), {}
            self._pending.clear()
        for handle in handles:
            handle.remove()
