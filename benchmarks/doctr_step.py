"""Step time of doctr's fit_one_epoch: buggy (unpatched), patched by shims, and hand-fixed (upstream PR #1862),
run alternately in one process on the same model, plus one forward alone for the theoretical gain.

    .venv/bin/python benchmarks/doctr_step.py [--arch vitstr_small] [--batch-size 16] [--rounds 12] [--steps 3]
        [--device auto|cpu|cuda] [--amp] [--check-steps 3] [--json results.json]

theoretical gain = (hand-fixed step + one forward) / hand-fixed step, measured here in the same run.
Goals: patched / hand-fixed <= 1.02; unpatched / patched >= 0.95 x theoretical gain.

Weights check (before the timing): each variant trains --check-steps steps from the same initial weights, seed and
batches; the final weights are compared with the hand-fixed run's. The tolerance is 0 (bitwise): patched and
hand-fixed run the same kernels in the same order on the same inputs, and on CUDA the check runs with
torch.use_deterministic_algorithms (warn_only; CUBLAS_WORKSPACE_CONFIG=:4096:8 for the whole process, as cuBLAS reads
it once), so run-to-run reduction order cannot explain a difference. Autocast does not change that: it picks the
same dtypes for both. Ops without a deterministic kernel are listed in the JSON; if any ran, a difference may be
rounding, and max |dw| and the number of elements that differ say how large it is. The unpatched run is reported,
not judged: its stray forward draws dropout RNG and updates BatchNorm statistics a second time.
"""

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
LR = 1e-4


def pick_device(parser, requested, torch):
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if requested == "auto" else requested
    if device == "cuda" and not cuda:
        parser.error("--device cuda: torch sees no CUDA device here")
    if device == "cpu" and cuda:
        # the loop, like upstream's, sends images to CUDA whenever CUDA is present: a CPU model would not run
        parser.error("--device cpu on a machine with CUDA: the loop moves images to CUDA whenever it is present")
    return device


def compare_weights(a, b):
    """Bitwise equality, the largest absolute difference (of floating tensors), the number of differing elements."""
    import torch
    differing = total = 0
    max_abs = 0.0
    for key in a:
        x, y = a[key], b[key]
        total += x.numel()
        if x.dtype != y.dtype or not torch.equal(x, y):
            diff = (x.double() - y.double()).abs()
            differing += int((diff != 0).sum())
            if x.is_floating_point():  # BatchNorm's integer step counter would swamp the scale of weights
                max_abs = max(max_abs, float(diff.max()))
    return {"bitwise": differing == 0, "max_abs_diff": max_abs, "elements_differing": differing,
            "elements": total}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vitstr_small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12, help="a multiple of 6 runs every order equally often")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed call of fit_one_epoch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when present (the loop moves images to CUDA whenever it is present)")
    parser.add_argument("--amp", action="store_true",
                        help="fit_one_epoch(amp=True): float16 autocast + GradScaler on CUDA, bfloat16 on CPU")
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the weights check (0: no check)")
    parser.add_argument("--json", default=None, help="also write the results to this file as JSON")
    args = parser.parse_args()

    # cuBLAS reads this once, at its first call: set before any CUDA work so the deterministic check can hold
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    import shims
    import doctr_train
    device = pick_device(parser, args.device, torch)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    buggy = doctr_train.fit_one_epoch
    shims.enable(patches=["doctr"], options={"SHIMS_DOCTR_MODULES": "doctr_train"})
    patched = doctr_train.fit_one_epoch
    assert patched is not buggy and patched.__wrapped__ is buggy, shims.status()["patches"]["doctr"]
    variants = {"unpatched": buggy, "patched": patched, "hand-fixed": doctr_train.fit_one_epoch_hand_fixed}

    torch.manual_seed(0)
    model = doctr_train.build_model(args.arch).to(device)
    forwards = [0]
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    loader = doctr_train.synthetic_words(args.steps, args.batch_size, seed=0)
    transforms = lambda x: (x - 0.5) / 0.25  # noqa: E731
    no_log = lambda **kw: None  # noqa: E731

    def fresh_optimizer():
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    weights, forwards_per_step, nondeterministic = {}, {}, []
    if args.check_steps:
        initial = copy.deepcopy(model.state_dict())
        check_loader = doctr_train.synthetic_words(args.check_steps, args.batch_size, seed=1)
        finals = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                for name, fn in variants.items():
                    model.load_state_dict(initial)
                    optimizer, scheduler = fresh_optimizer()
                    torch.manual_seed(1)  # the RNG stream the loop draws from (dropout), on every device
                    forwards[0] = 0
                    fn(model, check_loader, transforms, optimizer, scheduler, amp=args.amp, log=no_log)
                    forwards_per_step[name] = forwards[0] / args.check_steps
                    finals[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            finally:
                torch.use_deterministic_algorithms(False)
        nondeterministic = sorted({str(w.message)[:200] for w in caught if "deterministic" in str(w.message)})
        weights = {f"{name} vs hand-fixed": compare_weights(finals[name], finals["hand-fixed"])
                   for name in ("patched", "unpatched")}
        model.load_state_dict(initial)
        del finals

    optimizer, scheduler = fresh_optimizer()
    times = {name: [] for name in variants}
    times["forward alone"] = []
    peaks = {name: [] for name in variants}

    def run(name, fn):
        # one untimed step first: the step after a switch of variant pays for the allocator's change of pattern
        # (the unpatched loop keeps two graphs alive), which would be charged to whoever follows the unpatched loop
        fn(model, loader[:1], transforms, optimizer, scheduler, amp=args.amp, log=no_log)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn(model, loader, transforms, optimizer, scheduler, amp=args.amp, log=no_log)
        sync()
        elapsed = (time.perf_counter() - start) / args.steps
        if cuda:
            peaks[name].append(torch.cuda.max_memory_allocated() - base)
        return elapsed

    def forward_alone():
        model.train()
        sync()
        start = time.perf_counter()
        for images, targets in loader:
            model(transforms(images.to(device)), targets)["loss"]
        sync()
        return (time.perf_counter() - start) / args.steps

    for name, fn in variants.items():  # warm-up, not timed
        run(name, fn)
    for name in peaks:
        peaks[name].clear()
    orders = list(itertools.permutations(variants))  # every variant follows every other equally often
    for r in range(args.rounds):
        order = orders[r % len(orders)]
        for name in order:
            times[name].append(run(name, variants[name]))
        times["forward alone"].append(forward_alone())

    med = {name: statistics.median(v) for name, v in times.items()}
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"doctr fit_one_epoch, {args.arch}, batch {args.batch_size}, 32x128, {where}, amp={args.amp}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps "
          f"(median s/step)")
    for name in times:
        peak = f"   peak CUDA {statistics.median(peaks[name]) / 2**20:.0f} MiB" if peaks.get(name) else ""
        print(f"  {name:14s} {med[name] * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f}, max "
              f"{max(times[name]) * 1000:.1f}){peak}")

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
    if weights:
        print(f"weights after {args.check_steps} steps from the same start (tolerance 0: bitwise), forwards per step "
              f"{forwards_per_step}")
        for pair, result in weights.items():
            print(f"  {pair:24s} bitwise {result['bitwise']}   max |dw| {result['max_abs_diff']:.3g}   "
                  f"{result['elements_differing']} of {result['elements']} elements differ")
        for message in nondeterministic:
            print(f"  nondeterministic op ran: {message}")

    if args.json:
        result = {
            "benchmark": "doctr_step", "arch": args.arch, "batch_size": args.batch_size, "amp": args.amp,
            "device": device, "device_name": where, "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
            "median_s_per_step": med, "min_s_per_step": {k: min(v) for k, v in times.items()},
            "max_s_per_step": {k: max(v) for k, v in times.items()},
            "peak_cuda_bytes": {k: statistics.median(v) for k, v in peaks.items() if v} or None,
            "ratios": {"unpatched/hand-fixed": slower, "unpatched/patched": gain, "theoretical": theoretical,
                       "gain/theoretical": gain / theoretical, "patched/hand-fixed": same},
            "ratios_of_medians": {"unpatched/hand-fixed": slower_of_medians, "unpatched/patched": gain_of_medians,
                                  "patched/hand-fixed": same_of_medians},
            "weights_check": {"steps": args.check_steps, "tolerance": 0, "deterministic_algorithms": True,
                              "forwards_per_step": forwards_per_step, "pairs": weights,
                              "nondeterministic_ops": nondeterministic} if args.check_steps else None,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
