"""ultralytics validation during training: float32, unpatched `model.half()`, and the shims yolo patch, side by side.

    PYTHONPATH=<folder with ultralytics 8.4.61> .venv/bin/python benchmarks/yolo_eval.py [--imgsz 128] [--images 8]
        [--rounds 5] [--device cpu|cuda] [--json results.json]

(`pip install --no-deps --target <folder> ultralytics==8.4.61`: the last release with the cast; the tests keep one in
~/.cache/shims-tests/ultralytics/8.4.61.) One process, one YOLOv8n from its yaml (no weights), a synthetic dataset;
the trainer is set up once (`_setup_train`: EMA, validator, dataloaders) and each round calls
`trainer.validator(trainer)` once per variant, in a rotating order, the EMA restored bitwise before each call:

    float32            the validator as it runs on the CPU: no half
    half (unpatched)   the half path (on the CPU forced: `validator.args.half` reads True, the stand-in for CUDA + AMP):
                       model.half(), float16 forward and loss
    patched autocast   the same with the yolo patch: float32 weights, forward and loss under torch.autocast (torch's
                       default dtype for the device: bfloat16 on the CPU, float16 on CUDA)

On CUDA (--device cuda) the half path is ultralytics' own (amp=True), nothing is forced.
Printed per variant: median wall time of the validator call and its ratio to float32; memory: on CUDA the median peak
of torch.cuda.max_memory_allocated above the allocation before the call, on the CPU the median peak resident memory
above the level before the call (sampled every 2 ms, after gc and malloc_trim); whether the EMA came out bitwise as
it went in; the validation box loss (val/box_loss) for a sense of the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the value at entry, sampled by a background thread."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
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
        self.delta = max(self.peak, rss_bytes()) - self.base
        return False


class PeakCuda:
    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.torch.cuda.synchronize()
        self.base = self.torch.cuda.memory_allocated()
        self.torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.torch.cuda.synchronize()
        self.delta = self.torch.cuda.max_memory_allocated() - self.base
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()

    import shims
    import torch
    import ultralytics
    from ultralytics.models.yolo.detect import DetectionTrainer
    from tests.patches.yolo.ultralytics_run import force_half, write_dataset

    root = tempfile.mkdtemp(prefix="yolo_eval_")
    data = write_dataset(os.path.join(root, "data"), n=opts.images, size=opts.imgsz)
    trainer = DetectionTrainer(overrides=dict(model="yolov8n.yaml", data=data, epochs=1, imgsz=opts.imgsz, batch=4,
                                              workers=0, device=opts.device, plots=False, verbose=False,
                                              project=os.path.join(root, "runs"), name="b", exist_ok=True,
                                              amp=opts.device == "cuda"))
    trainer._setup_train()
    trainer.epoch, trainer.loss_items = 0, torch.zeros(3, device=trainer.device)  # what a training epoch leaves
    validator, ema = trainer.validator, trainer.ema.ema
    plain_args = type(validator.args)
    if opts.device == "cpu":
        force_half(validator)
    half_args = type(validator.args)
    start = {k: v.detach().clone() for k, v in ema.state_dict().items()}

    def restore():
        ema.float()
        with torch.no_grad():
            for k, v in ema.state_dict().items():
                v.copy_(start[k])

    variants = {"float32": (plain_args, False), "half (unpatched)": (half_args, False),
                "patched autocast": (half_args, True)}
    results = {name: {"times": [], "memory": [], "unchanged": [], "box_loss": None} for name in variants}
    names = list(variants)
    for round_index in range(opts.rounds + 1):  # round 0 warms up
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            args_class, patched = variants[name]
            restore()
            validator.args.__class__ = args_class
            trainer.amp = name != "float32" and opts.device == "cuda"
            if patched:
                shims.enable(patches=["yolo"])
            try:
                meter = PeakCuda(torch) if opts.device == "cuda" else PeakRss()
                with meter:
                    began = time.perf_counter()
                    metrics = validator(trainer)
                    if opts.device == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - began
            finally:
                if patched:
                    shims.disable()
            if round_index == 0:
                continue
            entry = results[name]
            entry["times"].append(elapsed)
            entry["memory"].append(meter.delta / 2 ** 20)
            entry["unchanged"].append(all(v.dtype == start[k].dtype and torch.equal(v, start[k])
                                          for k, v in ema.state_dict().items()))
            entry["box_loss"] = metrics.get("val/box_loss")

    base = statistics.median(results["float32"]["times"])
    print(f"ultralytics {ultralytics.__version__}, torch {torch.__version__}, {opts.device}, YOLOv8n imgsz "
          f"{opts.imgsz}, {opts.images} images, batch 4, {opts.rounds} rounds after a warm-up round, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<20} {'median s':>9} {'x float32':>10} {'peak MiB':>9} {'EMA bitwise unchanged':>22} "
          f"{'val/box_loss':>13}")
    for name, entry in results.items():
        median = statistics.median(entry["times"])
        print(f"{name:<20} {median:>9.3f} {median / base:>10.2f} {statistics.median(entry['memory']):>9.1f} "
              f"{str(all(entry['unchanged'])):>22} {entry['box_loss']!s:>13}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
