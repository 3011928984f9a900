"""Cost of the colossalai patch: step time with upstream's tensor hooks vs the patch's post-accumulate-grad hooks.

    python benchmarks/colossalai_hooks.py [--rounds 15] [--steps 5]

One process, CPU, torch.set_num_threads(1), world size 1 (no communication: what is left is the hooks' own cost).
The reducers are the ColossalAI-shaped references of tests/patches/colossalai/reference
(LowLevelZero 0.3.6-style bucketed ZeRO-2 and a Gemini-style wrapper), one copy patched by shims, one copy not. Variants run side by side, alternating
within each round; each sample is the mean of --steps steps; the script prints medians and ratios to the unpatched
variant on the same loss. The VQGAN loss is not timed unpatched: it crashes there (that is the bug).
Also a raw backward with no hook / a tensor hook / a post-accumulate-grad hook / the shims deferral, per parameter.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import shims  # noqa: E402
from shims.patches.colossalai import gradhooks  # noqa: E402
from tests.patches.colossalai import reference as ref  # noqa: E402
from tests.patches.colossalai.reference import vqgan  # noqa: E402

WIDTH, DEPTH, FEATURES, BATCH = 256, 6, 64, 64


class WideVQGAN(nn.Module):
    """VQGAN-shaped (encoder, decoder ending in `last_layer`, discriminator) but big enough to time: 16 parameters."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.decoder = nn.Sequential(*[m for _ in range(DEPTH - 3) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())],
                                     nn.Linear(WIDTH, FEATURES))
        self.discriminator = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))

    @property
    def last_layer(self):
        return self.decoder[-1].weight

    def forward(self, x):
        return self.decoder(self.encoder(x))


def load_unpatched(short):
    """A copy of a reference module under a private name: shims' import hooks never see it."""
    spec = importlib.util.spec_from_file_location(f"bench_unpatched_{short}", os.path.join(ref.HERE, f"{short}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loss_of(model, x, adaptive):
    reconstruction = model(x)
    nll = (x - reconstruction).abs().mean()
    g_loss = -model.discriminator(reconstruction).mean()
    if adaptive:
        return nll + vqgan.adaptive_weight(nll, g_loss, model.last_layer) * g_loss
    return nll + 0.1 * g_loss


def low_level_runner(module, adaptive, data):
    torch.manual_seed(0)
    model = WideVQGAN()
    zero = module.LowLevelZeroOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                        reduce_bucket_size=WIDTH * WIDTH * 2, partition_grad=True)

    def step(i):
        zero.backward(loss_of(model, data[i % len(data)], adaptive))
        zero.step()
    return step, lambda: zero.queued_for_reduction, len(list(model.parameters()))


def gemini_runner(module, adaptive, data):
    torch.manual_seed(0)
    model = WideVQGAN()
    ddp = module.GeminiDDP(model)
    optimizer = module.GeminiOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), ddp)

    def step(i):
        x = data[i % len(data)]
        reconstruction = ddp(x)
        nll = (x - reconstruction).abs().mean()
        g_loss = -model.discriminator(reconstruction).mean()
        weight = vqgan.adaptive_weight(nll, g_loss, model.last_layer) if adaptive else 0.1
        optimizer.backward(nll + weight * g_loss)
        optimizer.step()
    return step, lambda: ddp.chunk_manager.params_reduced, len(list(model.parameters()))


def raw_runner(kind, data):
    torch.manual_seed(0)
    model = WideVQGAN()
    for p in model.parameters():
        if kind == "tensor hook":
            p.register_hook(lambda g: None)
        elif kind == "post-accumulate-grad hook":
            p.register_post_accumulate_grad_hook(lambda q: None)
        elif kind == "shims deferral":
            p.register_hook(lambda g, p=p: gradhooks.defer_until_accumulated(p, lambda q: None))

    def step(i):
        model.zero_grad(set_to_none=True)
        loss_of(model, data[i % len(data)], False).backward()
    return step, lambda: 0, len(list(model.parameters()))


def bench(variants, rounds, steps):
    for step, _, _ in variants.values():  # warm-up
        for i in range(2):
            step(i)
    samples = {name: [] for name in variants}
    reductions = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            step, count, _ = variants[name]
            before = count()
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            samples[name].append((time.perf_counter() - start) / steps)
            reductions[name].append((count() - before) / steps)
    return {name: statistics.median(v) for name, v in samples.items()}, reductions


def report(title, medians, reductions, variants, baseline_of):
    print(f"\n{title}")
    print(f"{'variant':<44} {'median ms/step':>14} {'ratio':>7} {'reductions/step':>16} {'params':>7}")
    for name, median in medians.items():
        base = baseline_of.get(name)
        ratio = f"{median / medians[base]:.3f}" if base else "-"
        print(f"{name:<44} {median * 1e3:>14.3f} {ratio:>7} {statistics.median(reductions[name]):>16g} "
              f"{variants[name][2]:>7}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(BATCH, FEATURES, generator=g) for _ in range(4)]

    unpatched = {short: load_unpatched(short) for short in ref.UPSTREAM_NAMES}
    patched = ref.install_as_upstream()
    shims.enable(patches=["colossalai"])
    try:
        variants = {
            "LowLevelZero, tensor hooks (0.3.6), plain loss": low_level_runner(unpatched["low_level_optim"], False,
                                                                               data),
            "LowLevelZero, patched, plain loss": low_level_runner(patched["low_level_optim"], False, data),
            "LowLevelZero, patched, VQGAN loss": low_level_runner(patched["low_level_optim"], True, data),
            "Gemini, tensor hook, plain loss": gemini_runner(unpatched["gemini_ddp"], False, data),
            "Gemini, patched (deferred), plain loss": gemini_runner(patched["gemini_ddp"], False, data),
            "Gemini, patched (deferred), VQGAN loss": gemini_runner(patched["gemini_ddp"], True, data),
        }
        medians, reductions = bench(variants, args.rounds, args.steps)
        baseline = {"LowLevelZero, patched, plain loss": "LowLevelZero, tensor hooks (0.3.6), plain loss",
                    "Gemini, patched (deferred), plain loss": "Gemini, tensor hook, plain loss"}
        print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.steps} steps, batch {BATCH}, "
              f"width {WIDTH}")
        report("ZeRO step (forward, backward with hooks and bucketed reduction, optimizer step)", medians, reductions,
               variants, baseline)
        raw = {kind: raw_runner(kind, data) for kind in ("no hook", "tensor hook", "post-accumulate-grad hook",
                                                          "shims deferral")}
        medians, reductions = bench(raw, args.rounds, args.steps)
        report("forward + backward only, one no-op hook per parameter", medians, reductions, raw,
               {k: "no hook" for k in raw if k != "no hook"})
    finally:
        shims.disable()
        ref.uninstall_upstream()


if __name__ == "__main__":
    main()
