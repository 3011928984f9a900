"""The gradhooks suite again, on the mechanism torch 2.0 has: hooks on the parameter's AccumulateGrad node.

torch 2.0 has no `Tensor.register_post_accumulate_grad_hook`; gradhooks then hooks the gradient accumulator
node, as DeepSpeed and Megatron did before torch 2.1. Here the method is removed from torch.Tensor for each test, and
every test of test_gradhooks.py runs unchanged: the same semantics (once per backward, after accumulation,
never for torch.autograd.grad) must hold. The matrix runs the same tests on a real torch 2.0.
"""

from __future__ import annotations

import pytest
import torch

from shims.patches.colossalai import gradhooks
from tests.patches.colossalai import test_gradhooks as suite


@pytest.fixture(autouse=True)
def torch_without_post_accumulate_grad_hook(monkeypatch):
    if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        monkeypatch.delattr(torch.Tensor, "register_post_accumulate_grad_hook")
    assert gradhooks.post_accumulate_mechanism() == "accumulator node hook"
    yield


for _name in dir(suite):
    if _name.startswith("test_"):
        globals()[_name] = getattr(suite, _name)
del _name


def test_a_collected_parameter_leaves_nothing_behind():
    pytest.skip("with the accumulator node hook a hooked parameter lives until its hook is removed (the node holds "
                "the parameter; autograd keeps the node only weakly, so shims holds it): see "
                "test_removing_the_hook_releases_the_parameter")


def test_removing_the_hook_releases_the_parameter():
    import gc
    import weakref
    w = torch.nn.Parameter(torch.ones(3))
    fired = []
    handle = gradhooks.register_reduction_hook(w, lambda p: fired.append("reduced"))
    tensor_hook = w.register_hook(lambda grad: gradhooks.defer_until_accumulated(w, lambda p: fired.append("deferred")))
    (2 * w).sum().backward()
    assert sorted(fired) == ["deferred", "reduced"]
    tensor_hook.remove()
    alive = weakref.ref(w)
    handle.remove()
    gradhooks.clear_deferred(w)
    del w
    gc.collect()
    assert alive() is None, "the parameter outlived the removal of its hooks"


def test_graph_task_id_is_negative_outside_backward_and_shared_by_one_backwards_hooks():
    if not hasattr(torch._C, "_current_graph_task_id"):  # asked of torch, not of the function under test
        pytest.skip("this torch has no torch._C._current_graph_task_id; matching falls back to the latest firing")
    w = torch.nn.Parameter(torch.ones(3))
    ids = []
    w.register_hook(lambda grad: ids.append(gradhooks.graph_task_id()))
    handle = gradhooks.post_accumulate_hook(w, lambda p: ids.append(gradhooks.graph_task_id()))
    (2 * w).sum().backward()
    (2 * w).sum().backward()
    handle.remove()
    assert len(ids) == 4 and None not in ids, ids
    assert ids[0] == ids[1] != ids[2] == ids[3]
