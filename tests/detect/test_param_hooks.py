"""hook-in-autograd-grad and hook-fired-twice (shims/detect/detectors/param_hooks.py): the VQGAN adaptive weight of
ColossalAI #5601, in our words; silent with post-accumulate-grad hooks and plain backward."""

from __future__ import annotations

import torch
from torch import nn

from tests.detect.conftest import line_of, observe


# ---------------------------------------------------------------- 5. parameter hooks


class BucketReducer:
    """The old ColossalAI LowLevelZero shape (before PR #5596): a tensor hook per parameter queues its gradient."""

    def __init__(self, params, post_accumulate=False):
        self.queued = []
        self.accumulators = []  # torch 2.0: the gradient-accumulator nodes hooked (kept alive here)
        for param in params:
            if post_accumulate and hasattr(param, "register_post_accumulate_grad_hook"):
                param.register_post_accumulate_grad_hook(self.queue_accumulated)
            elif post_accumulate:  # torch 2.0 (no post-accumulate hook): the accumulator node, as DeepSpeed did
                accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
                accumulator.register_hook(lambda *_, param=param: self.queue_accumulated(param))
                self.accumulators.append(accumulator)
            else:
                param.register_hook(self.make_queue(param))  # reduction hook

    def make_queue(self, param):
        def queue(grad):
            self.queued.append(param)
            return grad
        return queue

    def queue_accumulated(self, param):
        self.queued.append(param)


class TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 3)
        self.decoder = nn.Linear(3, 6)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x)))


def adaptive_weight(nll_loss, g_loss, last_layer):
    """The taming-transformers VQGAN adaptive weight: two autograd.grad calls on the last layer (ColossalAI #5601)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grads.norm() / (g_grads.norm() + 1e-4)).clamp(0, 1e4).detach()


def vqgan_steps(post_accumulate, steps=3):
    torch.manual_seed(0)
    model = TinyAutoencoder()
    reducer = BucketReducer(model.parameters(), post_accumulate=post_accumulate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(4, 6)
        recon = model(x)
        nll_loss = (recon - x).abs().mean()
        g_loss = -recon.mean()
        weight = adaptive_weight(nll_loss, g_loss, model.decoder.weight)
        optimizer.zero_grad()
        (nll_loss + weight * g_loss).backward()
        optimizer.step()
    return reducer


def test_tensor_hook_fired_by_autograd_grad_is_found():
    reducers = []
    findings = observe(lambda: reducers.append(vqgan_steps(post_accumulate=False, steps=3)))
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("hook-in-autograd-grad", line_of("reduction hook"), 6)]  # 2 autograd.grad calls x 3 steps
    # the hook really ran for autograd.grad: 4 parameters per backward + 2 phantom entries per step
    assert len(reducers[0].queued) == 3 * (4 + 2)
    assert "register_post_accumulate_grad_hook" in findings[0]["fix"]


def test_post_accumulate_grad_hooks_have_no_findings():
    """The fixed shape (ColossalAI PR #5596): post-accumulate-grad hooks, which autograd.grad does not fire."""
    reducers = []
    assert observe(lambda: reducers.append(vqgan_steps(post_accumulate=True, steps=3))) == []
    assert len(reducers[0].queued) == 3 * 4


def test_tensor_hooks_with_plain_backward_have_no_findings():
    torch.manual_seed(0)
    model = TinyAutoencoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train():
        BucketReducer(model.parameters())
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            optimizer.step()
    assert observe(train) == []


def test_hook_registered_twice_fires_twice_per_backward():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    fired = []

    def train():
        for _ in range(2):  # e.g. an optimizer wrapper built twice over the same parameters
            layer.weight.register_hook(lambda g: fired.append(1))  # hook registered in a loop
        for _ in range(3):
            optimizer.zero_grad()
            layer(torch.randn(2, 3)).sum().backward()
            optimizer.step()
    findings = observe(train)
    assert len(fired) == 6
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("hook-fired-twice", line_of("hook registered in a loop"), 3)]
