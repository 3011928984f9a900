"""RF-DETR evaluation with fp16_eval: float32, unpatched `model.half()`, and the shims detr patch, side by side.

    .venv/bin/python benchmarks/detr_eval.py [--resolution 384] [--images 2] [--batch 2] [--rounds 3]

One process, one randomly initialised RF-DETR Nano (pretrain_weights=None, nothing downloaded), one synthetic COCO
validation set written to a temporary folder. Each round runs every variant once on a fresh copy of the model, in a
rotating order, through rfdetr 1.5.2's real `rfdetr.engine.evaluate`:

    float32            the original evaluate, fp16_eval=False (rfdetr's default path; builds an autograd graph)
    half (unpatched)   the original evaluate, fp16_eval=True: model.half(), inputs .half(), no autocast on CPU
    patched auto       the detr patch, fp16_eval=True, SHIMS_DETR_DTYPE=auto (float32 on CPU, float16 on CUDA)
    patched bfloat16   the detr patch with SHIMS_DETR_DTYPE=bfloat16 (CPU autocast)
    patched float16    the detr patch with SHIMS_DETR_DTYPE=float16 (CPU autocast)

Printed per variant: median wall time of the evaluate call and its ratio to float32; median peak resident memory
above the level just before the call (RSS sampled every 2 ms by a thread, after gc and malloc_trim; this is process
memory, not a tensor count: tracemalloc does not see tensor storage); the largest absolute deviation of the raw
model outputs (pred_logits, pred_boxes, over every batch) from the float32 variant; the parameters' dtype after the
call, and whether the outputs carried an autograd graph.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
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
    opts = parser.parse_args()

    import torch
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import rfdetr.engine

    import shims
    from tests import detr_reference as ref
    root = ref.write_coco_dataset(tempfile.mkdtemp(prefix="detr_bench_"), num_images=opts.images,
                                  size=opts.resolution)
    template, criterion, post, loader, base_ds, args = ref.build_rfdetr_nano(root, resolution=opts.resolution)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=opts.batch, shuffle=False,
                                         collate_fn=loader.collate_fn)
    original = rfdetr.engine.evaluate
    variants = [("float32", original, False), ("half (unpatched)", original, True)]
    for dtype in ("auto", "bfloat16", "float16"):
        shims.enable(patches=["detr"], options={"SHIMS_DETR_DTYPE": dtype, "SHIMS_DETR_MODULES": ""})
        variants.append((f"patched {dtype}", rfdetr.engine.evaluate, True))
        shims.disable()  # the wrapper taken above keeps working; the module attribute is the original again
    assert all(v[1] is not original for v in variants[2:]), "the detr patch did not apply"

    def run(evaluate, fp16_eval):
        model = copy.deepcopy(template)
        run_args = copy.copy(args)
        run_args.fp16_eval = fp16_eval
        outputs, graph = [], [False]

        def record(module, inputs, out):
            graph[0] |= out["pred_boxes"].grad_fn is not None
            outputs.append([out["pred_logits"].detach().float().clone(), out["pred_boxes"].detach().float().clone()])

        handle = model.register_forward_hook(record)
        with contextlib.redirect_stdout(io.StringIO()), PeakRss() as memory:
            start = time.perf_counter()
            evaluate(model, criterion, post, loader, base_ds, torch.device("cpu"), args=run_args)
            elapsed = time.perf_counter() - start
        handle.remove()
        dtype = next(model.parameters()).dtype
        del model
        return elapsed, memory.delta, outputs, dtype, graph[0]

    results = {name: {"time": [], "rss": []} for name, _, _ in variants}
    reference = None
    for round_index in range(opts.rounds + 1):  # round 0 warms every variant up and is not counted
        shift = round_index % len(variants)
        for name, evaluate, fp16_eval in variants[shift:] + variants[:shift]:
            elapsed, rss, outputs, dtype, graph = run(evaluate, fp16_eval)
            entry = results[name]
            if name == "float32" and reference is None:
                reference = outputs
            entry.setdefault("outputs", outputs)
            entry["dtype"], entry["graph"] = dtype, graph
            if round_index:
                entry["time"].append(elapsed)
                entry["rss"].append(rss)

    base_time = statistics.median(results["float32"]["time"])
    print(f"RF-DETR Nano (random init), {opts.images} images {opts.resolution}x{opts.resolution}, batch {opts.batch}, "
          f"{opts.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'variant':<18} {'median s':>9} {'x float32':>9} {'peak RSS MiB':>13} {'max|dlogits|':>13} "
          f"{'max|dboxes|':>12} {'params after':>13} {'graph':>6}")
    for name, _, _ in variants:
        entry = results[name]
        dev_logits = max((a[0] - b[0]).abs().max().item() for a, b in zip(entry["outputs"], reference))
        dev_boxes = max((a[1] - b[1]).abs().max().item() for a, b in zip(entry["outputs"], reference))
        median_time = statistics.median(entry["time"])
        print(f"{name:<18} {median_time:>9.3f} {median_time / base_time:>9.2f} "
              f"{statistics.median(entry['rss']) / 2**20:>13.1f} {dev_logits:>13.2e} {dev_boxes:>12.2e} "
              f"{str(entry['dtype']).replace('torch.', ''):>13} {str(entry['graph']):>6}")


if __name__ == "__main__":
    main()
