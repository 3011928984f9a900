"""What detect mode needs from torch, feature-detected once per session (torch 2.0 to the newest), never by version.

Each API either exists, has a fallback here, or is missing: a detector that needs a missing one names it in its
`missing(api)` and is refused with that reason in the receipt (never a silent "no findings").

    is_compiling        torch.compiler.is_compiling (2.3+); else torch._dynamo.is_compiling, bound when torch._dynamo
                        is imported (2.0-2.2; importing it ourselves costs ~0.7 s); before that nothing can be tracing
    forward hooks       register_module_forward_hook(with_kwargs=, always_call=) (checked here: 2.0.1 has neither, 2.2.2
                        and 2.5.1 always_call only, 2.14.1 both), detected apart;
                        without kwargs the hook sees positional inputs only; without always_call the session resets its
                        nesting depth itself (a forward that raised never calls the hook)
    graph_task_id       torch._C._current_graph_task_id: -1 outside a backward (tells autograd's own re-run forwards,
                        activation checkpointing, from the user's, and one backward from the next)
    node_prehooks       grad_fn.register_prehook (2.0+): how a graph learns that a backward reached it
    step_hooks          torch.optim.optimizer.register_optimizer_step_post_hook (2.0+): the optimizer-step clock
    post_accumulate     Tensor.register_post_accumulate_grad_hook (2.1+): only named in a fix when it exists
"""

from __future__ import annotations

import inspect
import sys


def _false():
    return False


class TorchAPI:
    """The torch APIs this process offers detect mode. `missing(*names)` says which of them are absent, and why."""

    def __init__(self, torch):
        from torch.nn.modules import module as module_hooks
        from torch.optim import optimizer as optimizer_hooks
        self.torch = torch
        self.module_hooks = module_hooks
        self.optimizer_hooks = optimizer_hooks
        self.forward_hook_options = _keywords(module_hooks.register_module_forward_hook) & {"with_kwargs",
                                                                                             "always_call"}
        # torch 2.x: a with_kwargs handle forgets this table's entry on remove(); the session deletes it itself
        self.kwargs_table = getattr(module_hooks, "_global_forward_hooks_with_kwargs", None) \
            if "with_kwargs" in self.forward_hook_options else None
        self.graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
        node = getattr(getattr(torch.autograd, "graph", None), "Node", None)
        self.node_prehooks = node is not None and hasattr(node, "register_prehook")
        self.step_hooks = getattr(optimizer_hooks, "register_optimizer_step_post_hook", None)
        self.post_accumulate = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")
        self.is_compiling = compiler_is_compiling(torch)
        self.compiling_bound_late = self.is_compiling is None  # bind torch._dynamo.is_compiling when it is imported
        if self.is_compiling is None:
            self.is_compiling = dynamo_is_compiling() or _false

    _WHAT = {
        "graph_task_id": "torch._C._current_graph_task_id (which backward is running)",
        "node_prehooks": "grad_fn.register_prehook (whether a backward reached a graph)",
        "step_hooks": "torch.optim.optimizer.register_optimizer_step_post_hook (the optimizer-step clock)",
        "post_accumulate": "Tensor.register_post_accumulate_grad_hook",
    }

    def missing(self, *names):
        """None when every named API exists, else the reason for a refusal: which ones this torch lacks."""
        absent = [self._WHAT.get(name, name) for name in names if not getattr(self, name, None)]
        if not absent:
            return None
        version = getattr(self.torch, "__version__", "?")
        return f"torch {version} has no {' and no '.join(absent)}"

    def limits(self):
        """What the fallbacks in use give up, in words (notes in the receipt); empty on a torch that has everything."""
        notes = []
        if "with_kwargs" not in self.forward_hook_options:
            notes.append("global forward hooks without kwargs in this torch: a forward's keyword inputs are not seen "
                         "(unused-forward matches forwards by their first positional tensor)")
        if "always_call" not in self.forward_hook_options:
            notes.append("global forward hooks without always_call in this torch: a forward that raises is noticed "
                         "when its module runs again or at the next optimizer step")
        return notes


def compiler_is_compiling(torch):
    """torch.compiler.is_compiling, or None where this torch has none (2.0-2.2)."""
    return getattr(getattr(torch, "compiler", None), "is_compiling", None)


def dynamo_is_compiling():
    """torch._dynamo.is_compiling when torch._dynamo is imported (torch 2.0-2.2), else None."""
    dynamo = sys.modules.get("torch._dynamo")
    return getattr(dynamo, "is_compiling", None) if dynamo is not None else None


def _keywords(function):
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: assume the oldest form
        return set()
