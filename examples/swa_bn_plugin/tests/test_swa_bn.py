"""The swa_bn plug-in, tested with shims.testing: fidelity against the upstream-fixed pass, and every order of
import / patch / unpatch. Run with the plug-in installed (`pip install .`): shims finds it by its entry point."""

import torch

import swa_reference
from shims.testing import snapshot

OPTIONS = {"SHIMS_SWA_BN_MODULES": "swa_reference"}


def _model_and_batches():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4), torch.nn.BatchNorm1d(4))
    batches = [(torch.randn(5, 3, 8, 8), torch.zeros(5)) for _ in range(4)]
    return model, batches


def _pass(function_name):
    """One re-estimation pass; the result: weights and buffers after it, an eval output, and whether any forward
    inside the pass built an autograd graph."""
    def run():
        model, batches = _model_and_batches()
        graphs = []
        model.register_forward_hook(lambda module, args, output: graphs.append(output.grad_fn is not None))
        getattr(swa_reference, function_name)(batches, model)  # looked up now: the patched one when patched
        model.eval()
        with torch.no_grad():
            output = model(batches[0][0])
        return {"state": snapshot(model), "output": output, "graphs_built": any(graphs)}
    return run


def test_patched_pass_is_the_upstream_fixed_pass_bitwise(shims_fidelity):
    result = shims_fidelity(_pass("bn_update"), _pass("bn_update_fixed"), patch="swa_bn", options=OPTIONS)
    assert result.unpatched["graphs_built"] is True  # the bug is real: graphs built during the pass
    assert result.patched["graphs_built"] is False
    record = result.record("swa_bn")
    assert record["targets"]["swa_reference:bn_update"]["status"] == "applied"
    assert record["targets"]["torch.optim.swa_utils:update_bn"]["status"] == "fixed-upstream"
    assert record["counters"] == {"passes_without_grad": 1}


def test_the_fixed_copy_is_left_alone(shims_fidelity):
    result = shims_fidelity(_pass("bn_update_fixed"), _pass("bn_update_fixed"), patch="swa_bn",
                            options={"SHIMS_SWA_BN_FUNCTIONS": "bn_update_fixed", **OPTIONS}, require_applied=False)
    target = result.record("swa_bn")["targets"]["swa_reference:bn_update_fixed"]
    assert target["status"] == "fixed-upstream" and "already turns gradients off" in target["reason"]


def test_every_order_of_import_patch_unpatch(shims_orderings):
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    result = shims_orderings("swa_bn", ["swa_reference"], options=OPTIONS, path=[here])
    assert result.targets() == ["swa_reference:bn_update"]
