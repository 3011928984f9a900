"""RF-DETR evaluation with fp16_eval: float32, unpatched `model.half()`, and the shims detr patch, side by side.

    .venv/bin/python benchmarks/detr_eval.py [--resolution 384] [--images 2] [--batch 2] [--rounds 3]
        [--device auto|cpu|cuda] [--rfdetr-amp] [--json results.json]

One process, one randomly initialised RF-DETR Nano (pretrain_weights=None, nothing downloaded), one synthetic COCO
validation set written to a temporary folder. Each round runs every variant once on a fresh copy of the model, in a
rotating order, through rfdetr 1.5.2's real `rfdetr.engine.evaluate`:

    float32            the original evaluate, fp16_eval=False (rfdetr's default path; builds an autograd graph)
    half (unpatched)   the original evaluate, fp16_eval=True: model.half(), inputs .half(), no autocast on CPU
    patched auto       the detr patch, fp16_eval=True, SHIMS_DETR_DTYPE=auto (float32 on CPU, float16 on CUDA)
    patched bfloat16   the detr patch with SHIMS_DETR_DTYPE=bfloat16 (CPU autocast)
    patched float16    the detr patch with SHIMS_DETR_DTYPE=float16 (CPU autocast)

On CUDA (--device cuda) `patched auto` is left out: auto is float16 there, the same as `patched float16`.
rfdetr's own `autocast(enabled=args.amp)` around the forward is off (args.amp=False) in every variant, so float32 is
float32 and the unpatched variant is `.half()` alone; --rfdetr-amp turns it on for the fp16_eval variants as rfdetr's
TrainConfig does (amp=True: bfloat16 where supported), which the patch's own autocast, nested inside, overrides.

Printed per variant: median wall time of the evaluate call and its ratio to float32; memory: on CUDA the median
peak of torch.cuda.max_memory_allocated above the allocation just before the call, on the CPU the median peak
resident memory above the level just before the call (RSS sampled every 2 ms by a thread, after gc and malloc_trim;
this is process memory, not a tensor count: tracemalloc does not see tensor storage); the largest absolute deviation
of the raw model outputs (pred_logits, pred_boxes, over every batch) from the float32 variant; the parameters' dtype
after the call; whether every parameter and buffer came out bitwise as it went in (dtype and values); whether the
outputs carried an autograd graph.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the value at entry, sampled by a background thread."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so each run starts from a like baseline
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=384, help="image side (multiple of 64); Nano's default")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    parser.add_argument("--rfdetr-amp", action="store_true",
                        help="args.amp=True for the fp16_eval variants (rfdetr's TrainConfig default)")
    parser.add_argument("--json", default=None, help="also write the results to this file as JSON")
    opts = parser.parse_args()

    import torch
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    cuda = device == "cuda"
    import rfdetr.engine
    logging.getLogger("rf-detr").setLevel(logging.WARNING)  # its per-evaluation INFO summary would bury the table

    import shims
    from tests.patches.detr import reference as ref
    root = ref.write_coco_dataset(tempfile.mkdtemp(prefix="detr_bench_"), num_images=opts.images,
                                  size=opts.resolution)
    template, criterion, post, loader, base_ds, args = ref.build_rfdetr_nano(root, resolution=opts.resolution)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=opts.batch, shuffle=False,
                                         collate_fn=loader.collate_fn)
    original = rfdetr.engine.evaluate
    template.to(device)
    criterion.to(device)
    variants = [("float32", original, False), ("half (unpatched)", original, True)]
    for dtype in ("bfloat16", "float16") if cuda else ("auto", "bfloat16", "float16"):
        shims.enable(patches=["detr"], options={"SHIMS_DETR_DTYPE": dtype, "SHIMS_DETR_MODULES": ""})
        variants.append((f"patched {dtype}", rfdetr.engine.evaluate, True))
        shims.disable()  # the wrapper taken above keeps working; the module attribute is the original again
    assert all(v[1] is not original for v in variants[2:]), "the detr patch did not apply"

    reference_state = {k: v.detach().clone() for k, v in template.state_dict().items()}

    def unchanged(model):
        state = model.state_dict()
        return state.keys() == reference_state.keys() and all(
            state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in reference_state.items())

    def run(evaluate, fp16_eval):
        model = copy.deepcopy(template)
        run_args = copy.copy(args)
        run_args.fp16_eval = fp16_eval
        run_args.amp = opts.rfdetr_amp and fp16_eval
        outputs, graph = [], [False]

        def record(module, inputs, out):
            graph[0] |= out["pred_boxes"].grad_fn is not None
            outputs.append([out["pred_logits"].detach().float().clone(), out["pred_boxes"].detach().float().clone()])

        handle = model.register_forward_hook(record)
        memory = contextlib.nullcontext() if cuda else PeakRss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with contextlib.redirect_stdout(io.StringIO()), memory:
            start = time.perf_counter()
            evaluate(model, criterion, post, loader, base_ds, torch.device(device), args=run_args)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        handle.remove()
        peak = torch.cuda.max_memory_allocated() - base if cuda else memory.delta
        dtype = next(model.parameters()).dtype
        same = unchanged(model)
        del model
        return elapsed, peak, outputs, dtype, graph[0], same

    results = {name: {"time": [], "rss": []} for name, _, _ in variants}
    reference = None
    for round_index in range(opts.rounds + 1):  # round 0 warms every variant up and is not counted
        shift = round_index % len(variants)
        for name, evaluate, fp16_eval in variants[shift:] + variants[:shift]:
            elapsed, rss, outputs, dtype, graph, same = run(evaluate, fp16_eval)
            entry = results[name]
            if name == "float32" and reference is None:
                reference = outputs
            entry.setdefault("outputs", outputs)
            entry["dtype"], entry["graph"] = dtype, graph
            entry["unchanged"] = entry.get("unchanged", True) and same
            if round_index:
                entry["time"].append(elapsed)
                entry["rss"].append(rss)

    base_time = statistics.median(results["float32"]["time"])
    where = torch.cuda.get_device_name() if cuda else "CPU"
    memory_kind = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(f"RF-DETR Nano (random init), {opts.images} images {opts.resolution}x{opts.resolution}, batch {opts.batch}, "
          f"{opts.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, "
          f"rfdetr amp for fp16_eval: {opts.rfdetr_amp}")
    print(f"{'variant':<18} {'median s':>9} {'x float32':>9} {memory_kind:>13} {'max|dlogits|':>13} "
          f"{'max|dboxes|':>12} {'params after':>13} {'unchanged':>9} {'graph':>6}")
    table = {}
    for name, _, _ in variants:
        entry = results[name]
        dev_logits = max((a[0] - b[0]).abs().max().item() for a, b in zip(entry["outputs"], reference))
        dev_boxes = max((a[1] - b[1]).abs().max().item() for a, b in zip(entry["outputs"], reference))
        median_time = statistics.median(entry["time"])
        table[name] = {"median_s": median_time, "x_float32": median_time / base_time,
                       "peak_bytes": statistics.median(entry["rss"]), "max_abs_dlogits": dev_logits,
                       "max_abs_dboxes": dev_boxes, "params_after": str(entry["dtype"]).replace("torch.", ""),
                       "model_unchanged": entry["unchanged"], "graph": entry["graph"]}
        print(f"{name:<18} {median_time:>9.3f} {median_time / base_time:>9.2f} "
              f"{statistics.median(entry['rss']) / 2**20:>13.1f} {dev_logits:>13.2e} {dev_boxes:>12.2e} "
              f"{table[name]['params_after']:>13} {str(entry['unchanged']):>9} {str(entry['graph']):>6}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"benchmark": "detr_eval", "model": "RF-DETR Nano (random init)", "device": device,
                       "device_name": where, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "images": opts.images, "resolution": opts.resolution, "batch": opts.batch,
                       "rounds": opts.rounds, "rfdetr_amp": opts.rfdetr_amp,
                       "memory": "torch.cuda.max_memory_allocated above the start" if cuda else
                       "peak RSS above the start", "variants": table}, f, indent=1)


if __name__ == "__main__":
    main()
