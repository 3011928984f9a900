"""A tiny VQGAN-style autoencoder and the taming-transformers generator loss with its adaptive weight.

The loss follows taming-transformers' VQLPIPSWithDiscriminator (generator branch), in our own words: a
reconstruction loss `nll`, an adversarial loss `g_loss = -D(reconstruction).mean()`, and an adaptive weight
    d_weight = |grad(nll, last_layer)| / (|grad(g_loss, last_layer)| + 1e-4), clamped to [0, 1e4], detached,
where both gradients come from `torch.autograd.grad(..., last_layer, retain_graph=True)`: two autograd.grad calls on
the decoder's last weight before the real backward (the pattern of ColossalAI #5601).

`reference_training` is the single-process reference: the same model and data, each rank's shard of the batch run
one after the other, each shard's gradient taken alone (its own adaptive weight, as every rank computes its own),
then averaged as `(g_0 + g_1) / world` and handed to the same inner optimizer. Division by a power of two is exact
in float32 and a sum of two terms does not depend on order, so for 2 ranks the distributed result can match bitwise.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 6


class TinyVQGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, FEATURES))
        self.discriminator = nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, 1))

    @property
    def last_layer(self):
        return self.decoder[-1].weight

    def forward(self, x):
        return self.decoder(self.encoder(x))


def build_model(seed=0):
    torch.manual_seed(seed)
    return TinyVQGAN()


def batches(steps, micro_batches, world, per_rank=4, seed=1):
    """[step][micro][rank] -> input tensor; the same on every process."""
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(per_rank, FEATURES, generator=g) for _ in range(world)] for _ in range(micro_batches)]
            for _ in range(steps)]


def adaptive_weight(nll, g_loss, last_layer, disc_weight=0.8):
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


def generator_loss(model, x, use_adaptive_weight=True, disc_factor=1.0):
    """(loss, d_weight): VQGAN's generator loss; d_weight is None without the adaptive weight."""
    reconstruction = model(x)
    nll = (x - reconstruction).abs().mean()
    g_loss = -model.discriminator(reconstruction).mean()
    if not use_adaptive_weight:
        return nll + 0.1 * g_loss, None
    d_weight = adaptive_weight(nll, g_loss, model.last_layer)
    return nll + d_weight * disc_factor * g_loss, d_weight


def auxiliary_loss(model, x):
    """A second loss of the same step with its own backward (a codebook/commitment-like term)."""
    return 0.05 * model.encoder(x).pow(2).mean()


def make_inner_optimizer(params):
    return torch.optim.Adam(params, lr=1e-2)


def reference_training(data, world, use_adaptive_weight=True, two_backwards=False, seed=0):
    """Single process: returns (final parameters by name, {(step, micro, rank): d_weight})."""
    model = build_model(seed)
    params = [p for p in model.parameters()]
    optimizer = make_inner_optimizer(params)
    weights = {}
    for step_index, step in enumerate(data):
        total = [torch.zeros_like(p) for p in params]
        losses = [lambda m, x: generator_loss(m, x, use_adaptive_weight)]
        if two_backwards:
            losses.append(lambda m, x: (auxiliary_loss(m, x), None))
        for loss_fn in losses:
            per_rank = []
            for rank in range(world):
                for p in params:
                    p.grad = None
                for micro_index, micro in enumerate(step):
                    loss, d_weight = loss_fn(model, micro[rank])
                    if d_weight is not None:
                        weights[(step_index, micro_index, rank)] = float(d_weight)
                    (loss / len(step)).backward()
                # a parameter this loss does not reach has no gradient: it contributes zero
                per_rank.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
            for i in range(len(params)):
                averaged = per_rank[0][i].clone()
                for rank in range(1, world):
                    averaged = averaged + per_rank[rank][i]
                total[i] = total[i] + averaged / world
        for p, g in zip(params, total):
            p.grad = g
        optimizer.step()
        for p in params:
            p.grad = None
    return {name: p.detach().clone() for name, p in model.named_parameters()}, weights
