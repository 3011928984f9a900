"""The main job: a doctr-style training script run three ways, alternating, with numbers.

    bash scripts/demo.sh                       # sets up .venv, then runs this file
    .venv/bin/python examples/demo.py [--arch vitstr_small] [--rounds 3] [--steps 6] [--batch-size 16]

The script is examples/doctr_train.py, laid out like doctr's references/recognition/train_pytorch.py (<= v0.11.0),
whose `fit_one_epoch` runs a forward whose result is thrown away (doctr issue #1861, fixed by PR #1862):
    unpatched   python examples/doctr_train.py ...                   (the script as users run it)
    patched     python -m shims run examples/doctr_train.py ...      (the same script, not edited, with shims)
    hand-fixed  python examples/doctr_train.py --hand-fixed ...      (the loop as upstream fixed it)
Each variant runs in its own process, the three alternate for --rounds rounds, all with the same seed. Printed:
forwards per optimizer step, median step time and the ratios, whether the final weights (parameters and buffers)
are bitwise identical to the hand-fixed run, and the receipt shims wrote for the patched run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "doctr_train.py")
VARIANTS = ("unpatched", "patched", "hand-fixed")
WARMUP = 2  # steps not timed: measured here, the first two steps of a fresh process run 1.3-2x slower


def command(variant, args, out):
    train_args = ["--arch", args.arch, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--threads", str(args.threads), "--seed", "0", "--out", out]
    if args.amp:
        train_args.append("--amp")
    if variant == "patched":
        return [sys.executable, "-m", "shims", "run", SCRIPT] + train_args
    if variant == "hand-fixed":
        return [sys.executable, SCRIPT, "--hand-fixed"] + train_args
    return [sys.executable, SCRIPT] + train_args


def environment(variant, report):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    env["PYTHONHASHSEED"] = "0"
    if variant == "patched":
        env["SHIMS_PATCHES"] = "doctr"
        env["SHIMS_REPORT"] = report
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vitstr_small", help="doctr recognition model, or `tiny` (no doctr)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternating")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first WARMUP are not timed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    parser.add_argument("--amp", action="store_true", help="the amp branch (CPU autocast bfloat16 here)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps <= WARMUP:
        parser.error(f"--rounds must be >= 1 and --steps > {WARMUP} (the first {WARMUP} steps are warm-up)")

    work = tempfile.mkdtemp(prefix="shims-demo-")
    report = os.path.join(work, "receipt.json")
    results = {v: [] for v in VARIANTS}
    print(f"doctr-style training, {args.arch}, batch {args.batch_size} x 3x32x128, {args.steps} steps per run, "
          f"{args.rounds} round(s) of {', '.join(VARIANTS)} (alternating, one process each)", flush=True)
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            out = os.path.join(work, f"{variant}-{round_index}.json")
            start = time.perf_counter()
            proc = subprocess.run(command(variant, args, out), env=environment(variant, report),
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"the {variant} run failed (exit {proc.returncode}); its output is above")
            with open(out) as f:
                results[variant].append(json.load(f))
            run_median = statistics.median(results[variant][-1]["step_times"][WARMUP:])
            print(f"  round {round_index + 1} {variant:<10} {time.perf_counter() - start:6.1f} s, median step "
                  f"{run_median * 1000:7.1f} ms", flush=True)

    def median_step(variant):  # the median over every timed step of every run (the first steps are warm-up)
        return statistics.median(t for r in results[variant] for t in r["step_times"][WARMUP:])

    fixed = results["hand-fixed"][0]
    print()
    print(f"{'variant':<11} {'forwards/step':>13} {'median step':>12} {'vs hand-fixed':>13}  weights vs hand-fixed")
    steps = {v: median_step(v) for v in VARIANTS}
    for variant in VARIANTS:
        runs = results[variant]
        forwards = sorted({r["forwards_per_step"] for r in runs})
        same = all(r["weights"] == fixed["weights"] and r["losses"] == fixed["losses"] for r in runs)
        print(f"{variant:<11} {', '.join(f'{f:g}' for f in forwards):>13} {steps[variant] * 1000:9.1f} ms "
              f"{steps[variant] / steps['hand-fixed']:12.3f}x  {'bitwise identical' if same else 'DIFFERENT'}")
    if all(r["weights"] == fixed["weights"] for r in results["unpatched"]):
        print("(the unpatched weights match too: this model has no BatchNorm and dropout 0, so its stray forward costs "
              "time only; with BatchNorm or dropout it also changes the weights: try --arch tiny)")
    print()
    print(f"unpatched / patched step time: {steps['unpatched'] / steps['patched']:.3f}x "
          "(the dead forward removed; the upstream fix gives the same)")
    print(f"patched / hand-fixed step time: {steps['patched'] / steps['hand-fixed']:.3f}x")
    spread = max(max(m) / min(m) for m in ([statistics.median(r["step_times"][WARMUP:]) for r in results[v]]
                                           for v in VARIANTS))
    print(f"(runs of one variant differed by up to {100 * (spread - 1):.0f}% between processes here; "
          "benchmarks/doctr_step.py compares the loops in one process, where they differ only by the code)")
    patched_same = all(r["weights"] == fixed["weights"] for r in results["patched"])
    print(f"final weights (parameters and buffers), patched vs hand-fixed: "
          f"{'bitwise identical' if patched_same else 'DIFFERENT'} (sha256 {fixed['weights'][:16]}...)")
    try:
        with open(report) as f:
            receipt = json.load(f)["patches"]["doctr"]
        print(f"receipt of the patched run ({report}): doctr {receipt['status']}, counters {receipt['counters']}")
        for name, target in receipt["targets"].items():
            if target["status"] != "not-imported":  # the other places it would look (SHIMS_DOCTR_MODULES)
                print(f"  {name}: {target['status']} {target['reason']}".rstrip())
        for note in receipt["notes"]:
            print(f"  {note}")
    except (OSError, KeyError, ValueError) as exc:
        print(f"no receipt from the patched run: {exc}")
    return 0 if patched_same else 1


if __name__ == "__main__":
    sys.exit(main())
