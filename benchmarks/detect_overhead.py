"""Step time of the doctr-style training loop with and without the observe-only mode (SHIMS_MODE=detect), run
alternately in one process on the same model and data: plain, detect, plain, detect...

    .venv/bin/python benchmarks/detect_overhead.py [--arch vitstr_small] [--batch-size 16] [--rounds 7] [--steps 3]
                                                   [--loop buggy|fixed] [--threads N]

The loop is examples/doctr_train.py's fit_one_epoch (doctr <= 0.11.0, with its stray forward: the loop users run
`python -m shims doctor` on; the detectors then track two forwards and report one per step) or the hand-fixed one.
Detect mode here is the generic detectors only (shims.enable(patches="none", mode="detect")): the hooks on every
module call, the optimizer-step hook and the wrapped Tensor methods that the loop calls every step.
Goal: detect / plain <= 1.05 (median step time). The first round of each variant is a warm-up, not counted.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vitstr_small", help="a doctr recognition model, or `tiny` (no doctr)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each variant, alternating")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--loop", choices=("buggy", "fixed"), default="buggy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    import shims
    import doctr_train
    if args.threads:
        torch.set_num_threads(args.threads)
    loop = doctr_train.fit_one_epoch if args.loop == "buggy" else doctr_train.fit_one_epoch_hand_fixed
    torch.manual_seed(0)
    model = doctr_train.build_model(args.arch)
    loader = doctr_train.synthetic_words(args.steps, args.batch_size, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    transforms = lambda x: (x - 0.5) / 0.25  # noqa: E731
    steps = {"plain": [], "detect": []}
    found = []

    def run(variant, profile=None):
        if variant == "detect":
            shims.enable(patches="none", mode="detect")
        marks = [time.perf_counter()]

        def log(train_loss, lr):  # called once per step by the loop, after the optimizer and scheduler steps
            marks.append(time.perf_counter())
        try:
            if profile is not None:
                profile.enable()
            loop(model, loader, transforms, optimizer, scheduler, amp=False, log=log)
        finally:
            if profile is not None:
                profile.disable()
            if variant == "detect":
                shims.disable()
                found.append(shims.status()["patches"]["detect"]["findings"])
        return [b - a for a, b in zip(marks, marks[1:])]

    for round_index in range(args.rounds + 1):
        for variant in ("plain", "detect") if round_index % 2 == 0 else ("detect", "plain"):
            times = run(variant)
            if round_index:  # round 0 warms up both variants
                steps[variant].extend(times)

    plain, detect = statistics.median(steps["plain"]), statistics.median(steps["detect"])
    print(f"model {args.arch}, batch {args.batch_size}, loop {args.loop}, {args.rounds} rounds x {args.steps} steps "
          f"per variant, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, values in steps.items():
        print(f"  {name:<7} median step {statistics.median(values) * 1e3:9.2f} ms   (min {min(values) * 1e3:.2f}, "
              f"max {max(values) * 1e3:.2f}, n={len(values)})")
    print(f"  detect / plain = {detect / plain:.4f} (medians; goal <= 1.05), "
          f"{min(steps['detect']) / min(steps['plain']):.4f} (fastest steps: less sensitive to a busy machine)")
    # A load-independent view: the time spent inside shims' own functions during one more detect-mode round, under
    # cProfile (an upper bound: profiling inflates every Python call; torch's hook dispatch is not counted).
    import cProfile
    import pstats
    shims_folder = os.path.dirname(os.path.abspath(shims.__file__))
    profile = cProfile.Profile()
    profiled = run("detect", profile)  # the loop only: enabling and reverting are not per-step costs
    in_shims = sum(row[2] for (path, _, _), row in pstats.Stats(profile).stats.items()
                   if path.startswith(shims_folder))
    print(f"  time in shims code, one profiled detect round: {in_shims / len(profiled) * 1e3:.2f} ms per step, "
          f"{100 * in_shims / sum(profiled):.2f}% of the profiled step ({statistics.median(profiled) * 1e3:.0f} ms)")
    detect_steps = (args.rounds + 2) * args.steps
    kinds = ", ".join(f"{f['kind']} x{f['count']}" for f in found[-1]) if found and found[-1] else "none"
    print(f"  findings over the {detect_steps} detect-mode steps (warm-up included): {kinds}")


if __name__ == "__main__":
    main()
