"""Iteration time of DDP's find_unused_parameters choices on 2 gloo ranks (CPU), side by side in one run.

    python benchmarks/ddp_step.py [--rounds 30] [--iters 2] [--models yolo,deep] [--size 64]

Each variant is its own DistributedDataParallel object over an identical copy of the model; every round runs all
variants, `--iters` timed iterations each (forward, loss, backward, SGD step), in an order that rotates from round to
round, so machine noise falls on all of them alike. Variants:
    keep     find_unused_parameters=True, as YOLO-style trainers write it
    off      find_unused_parameters=False, written by hand
    static   static_graph=True, written by hand
    patched  find_unused_parameters=True written in `build_at_safe_site`, which SHIMS_DDP_SAFE_SITES lists: the ddp
             patch builds it with False (and keeps its error explainer on the object)
Models: `yolo` (ultralytics YOLOv8n from its yaml, no weights, images --size px) and `deep` (400 small Linear+Tanh
blocks: a graph with many nodes, where the unused-parameter walk of `keep` is visible).
Rank 0 prints the median iteration per variant, the median (and quartiles) of the per-round ratios to `off` (paired
within a round, so load from other processes cancels), and the cost of the one call the patched object adds per
iteration (its DDP._pre_forward wrapper), timed alone. The patch's goal: patched / off within 1%.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time

VARIANTS = ("keep", "off", "static", "patched")


def build_at_safe_site(model):
    """Written like DAMO-YOLO's build_ddp_model: True by hand; listed in SHIMS_DDP_SAFE_SITES by this benchmark."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)


def make_model(torch, name, size):
    torch.manual_seed(0)
    if name == "yolo":
        from ultralytics.nn.tasks import DetectionModel
        model = DetectionModel("yolov8n.yaml", nc=4, verbose=False).train()

        def batch(g):
            return torch.rand(2, 3, size, size, generator=g)

        def loss(out):
            return out["boxes"].square().mean() + out["scores"].square().mean()
    else:
        blocks = []
        for _ in range(400):
            blocks += [torch.nn.Linear(8, 8), torch.nn.Tanh()]
        model = torch.nn.Sequential(*blocks)

        def batch(g):
            return torch.randn(4, 8, generator=g)

        def loss(out):
            return out.square().mean()
    return model, batch, loss


def run_rank(opts):
    import copy

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{opts.port}", rank=opts.rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    from torch.nn.parallel import DistributedDataParallel as DDP

    import warnings

    import shims
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    report = []
    for name in opts.models.split(","):
        model, batch, loss_of = make_model(torch, name, opts.size)
        copies = {v: copy.deepcopy(model) for v in VARIANTS}
        # built before shims is enabled; broadcast_buffers=False as DAMO-YOLO and ultralytics write it
        ddps = {"keep": DDP(copies["keep"], broadcast_buffers=False, find_unused_parameters=True),
                "off": DDP(copies["off"], broadcast_buffers=False, find_unused_parameters=False),
                "static": DDP(copies["static"], broadcast_buffers=False, static_graph=True)}
        shims.enable(patches=["ddp"], options={"SHIMS_DDP_SAFE_SITES": "__main__:build_at_safe_site"})
        ddps["patched"] = build_at_safe_site(copies["patched"])
        assert ddps["patched"].find_unused_parameters is False, shims.status()["patches"]["ddp"]
        assert "_pre_forward" in ddps["patched"].__dict__  # timed as a user runs it: with the error explainer
        optimizers = {v: torch.optim.SGD(d.parameters(), lr=1e-4) for v, d in ddps.items()}
        g = torch.Generator().manual_seed(opts.rank)
        wall = {v: [] for v in VARIANTS}
        cpu = {v: [] for v in VARIANTS}
        wall_ratios = {v: [] for v in VARIANTS}
        cpu_ratios = {v: [] for v in VARIANTS}

        def step(variant):
            """(wall seconds, CPU seconds of this thread) for one iteration; the thread's CPU time leaves out
            waiting for the other rank and for the scheduler, which dominate the noise on a shared machine."""
            ddp, optimizer = ddps[variant], optimizers[variant]
            x = batch(g)
            start, start_cpu = time.perf_counter(), time.thread_time()
            loss_of(ddp(x)).backward()
            optimizer.step()
            optimizer.zero_grad()
            return time.perf_counter() - start, time.thread_time() - start_cpu

        for variant in VARIANTS:  # warm-up: first iterations rebuild buckets and run static_graph's one walk
            for _ in range(3):
                step(variant)
        for r in range(opts.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            round_wall, round_cpu = {}, {}
            for variant in order:
                spent = [step(variant) for _ in range(opts.iters)]
                wall[variant] += [w for w, _ in spent]
                cpu[variant] += [c for _, c in spent]
                round_wall[variant] = sum(w for w, _ in spent) / len(spent)
                round_cpu[variant] = sum(c for _, c in spent) / len(spent)
            for variant in VARIANTS:  # paired: a ratio within one round, where the machine's load is shared
                wall_ratios[variant].append(round_wall[variant] / round_wall["off"])
                cpu_ratios[variant].append(round_cpu[variant] / round_cpu["off"])
        report.append((name, len(wall["off"]), {
            "wall": ({v: quantiles(t) for v, t in wall.items()}, {v: quantiles(r) for v, r in wall_ratios.items()}),
            "cpu": ({v: quantiles(t) for v, t in cpu.items()}, {v: quantiles(r) for v, r in cpu_ratios.items()})}))
        overhead = pre_forward_overhead(torch, ddps, batch(g), opts.rounds)
    if opts.rank == 0:
        print(f"torch {torch.__version__}, 2 gloo ranks on CPU, 1 thread each; {opts.rounds} rounds x {opts.iters} "
              "iterations per variant per round, rotating order. Iteration = forward + loss + backward + SGD step.")
        print("wall: elapsed time on rank 0; cpu: CPU time of rank 0's training thread (no waiting). Ratios: median "
              "(25%-75%) of per-round ratios to `off`.")
        for name, n, clocks in report:
            print(f"\n{name} ({n} timed iterations per variant)")
            print(f"  {'variant':8} {'wall ms':>9} {'wall / off':>10} {'(25%-75%)':>17} {'cpu ms':>9} {'cpu / off':>10} "
                  f"{'(25%-75%)':>17}")
            for variant in VARIANTS:
                row = f"  {variant:8}"
                for clock in ("wall", "cpu"):
                    medians, ratios = clocks[clock]
                    low, mid, high = ratios[variant]
                    row += f" {medians[variant][1] * 1e3:9.3f} {mid:10.4f} {f'({low:.3f}-{high:.3f})':>17}"
                print(row)
            cpu_medians, cpu_ratios = clocks["cpu"]
            print(f"  keep - off = {(cpu_medians['keep'][1] - cpu_medians['off'][1]) * 1e3:.3f} ms CPU per iteration "
                  f"(the cost of the flag); patched / off = {cpu_ratios['patched'][1]:.4f} cpu, "
                  f"{clocks['wall'][1]['patched'][1]:.4f} wall")
        off_us, patched_us = overhead
        print(f"\nDDP._pre_forward under no_grad, alternating, medians: off {off_us:.2f} us, patched {patched_us:.2f} us "
              f"per call: the patch adds {patched_us - off_us:.2f} us per iteration at a safe site")
        sys.stdout.flush()
    dist.destroy_process_group()


def quantiles(values):
    values = sorted(values)
    n = len(values)
    return values[n // 4], values[n // 2], values[(3 * n) // 4]


def pre_forward_overhead(torch, ddps, x, rounds, calls=2000):
    """Microseconds per DDP._pre_forward call for `off` and `patched` (the only code they do not share), measured
    in alternating rounds with gradients off, so no reducer work and no communication is involved."""
    samples = {"off": [], "patched": []}
    with torch.no_grad():
        for r in range(rounds):
            for variant in (("off", "patched") if r % 2 == 0 else ("patched", "off")):
                pre_forward = ddps[variant]._pre_forward
                start = time.perf_counter()
                for _ in range(calls):
                    pre_forward(x)
                samples[variant].append((time.perf_counter() - start) / calls * 1e6)
    return quantiles(samples["off"])[1], quantiles(samples["patched"])[1]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--models", default="yolo,deep")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.rank is not None:
        return run_rank(opts)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--port", str(port),
                               "--rounds", str(opts.rounds), "--iters", str(opts.iters), "--models", opts.models,
                               "--size", str(opts.size)], env=env) for rank in range(2)]
    deadline = time.monotonic() + opts.timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        sys.exit(f"timed out after {opts.timeout} s")
    sys.exit(max(p.returncode for p in procs))


if __name__ == "__main__":
    main()
