"""Step time of doctr's fit_one_epoch: buggy (unpatched), patched by shims, and hand-fixed (upstream PR #1862),
run alternately in one process on the same model, plus one forward alone for the theoretical gain.

    .venv/bin/python benchmarks/doctr_step.py [--arch vitstr_small] [--batch-size 16] [--rounds 12] [--steps 3]

theoretical gain = (hand-fixed step + one forward) / hand-fixed step, measured here in the same run.
Goals (issue 3): patched / hand-fixed <= 1.02; unpatched / patched >= 0.95 x theoretical gain.
"""

import argparse
import itertools
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vitstr_small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12, help="a multiple of 6 runs every order equally often")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed call of fit_one_epoch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    import shims
    import doctr_train
    if args.threads:
        torch.set_num_threads(args.threads)
    buggy = doctr_train.fit_one_epoch
    shims.enable(patches=["doctr"], options={"SHIMS_DOCTR_MODULES": "doctr_train"})
    patched = doctr_train.fit_one_epoch
    assert patched is not buggy and patched.__wrapped__ is buggy, shims.status()["patches"]["doctr"]
    variants = {"unpatched": buggy, "patched": patched, "hand-fixed": doctr_train.fit_one_epoch_hand_fixed}

    torch.manual_seed(0)
    model = doctr_train.build_model(args.arch)
    loader = doctr_train.synthetic_words(args.steps, args.batch_size, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    transforms = lambda x: (x - 0.5) / 0.25  # noqa: E731
    times = {name: [] for name in variants}
    times["forward alone"] = []

    def run(fn):
        # one untimed step first: the step after a switch of variant pays for the allocator's change of pattern
        # (the unpatched loop keeps two graphs alive), which would be charged to whoever follows the unpatched loop
        fn(model, loader[:1], transforms, optimizer, scheduler, amp=False, log=lambda **kw: None)
        start = time.perf_counter()
        fn(model, loader, transforms, optimizer, scheduler, amp=False, log=lambda **kw: None)
        return (time.perf_counter() - start) / args.steps

    def forward_alone():
        model.train()
        start = time.perf_counter()
        for images, targets in loader:
            model(transforms(images), targets)["loss"]
        return (time.perf_counter() - start) / args.steps

    for name, fn in variants.items():  # warm-up, not timed
        run(fn)
    orders = list(itertools.permutations(variants))  # every variant follows every other equally often
    for r in range(args.rounds):
        order = orders[r % len(orders)]
        for name in order:
            times[name].append(run(variants[name]))
        times["forward alone"].append(forward_alone())

    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"doctr fit_one_epoch, {args.arch}, batch {args.batch_size}, 32x128, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps (median s/step)")
    for name in times:
        print(f"  {name:14s} {med[name] * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f}, max "
              f"{max(times[name]) * 1000:.1f})")
    # ratios: the median over rounds of the ratio within each round (every round runs every variant, so slow
    # phases of a shared machine cancel), and, in brackets, the ratio of the medians above
    def ratio(a, b):
        per_round = statistics.median(x / y for x, y in zip(times[a], times[b]))
        return per_round, med[a] / med[b]

    def theoretical_of(i):
        return (times["hand-fixed"][i] + times["forward alone"][i]) / times["hand-fixed"][i]

    theoretical = statistics.median(theoretical_of(i) for i in range(args.rounds))
    gain, gain_of_medians = ratio("unpatched", "patched")
    slower, slower_of_medians = ratio("unpatched", "hand-fixed")
    same, same_of_medians = ratio("patched", "hand-fixed")
    print("ratios: median of the per-round ratios [ratio of the medians]")
    print(f"  unpatched / hand-fixed      {slower:.3f}x  [{slower_of_medians:.3f}]")
    print(f"  unpatched / patched (gain)  {gain:.3f}x  [{gain_of_medians:.3f}]")
    print(f"  theoretical gain            {theoretical:.3f}x   (hand-fixed + one forward) / hand-fixed")
    print(f"  gain / theoretical          {gain / theoretical:.3f}   (goal >= 0.95)")
    print(f"  patched / hand-fixed        {same:.3f}   [{same_of_medians:.3f}]  (goal <= 1.02)")


if __name__ == "__main__":
    main()
