"""A tiny ultralytics training run on the CPU, recorded around each validation (run in a subprocess by the tests and
the benchmark, so that two ultralytics releases can be compared: each run imports the one first on PYTHONPATH).

    python ultralytics_run.py OUT.pt --root DIR [--patched] [--force-half] [--autocast float16] [--epochs N]
                                     [--big-weight V] [--no-val]

--force-half  the validator takes its half path on the CPU (`self.args.half` reads True whatever it is set to): the
              stand-in for a CUDA device with AMP, where ultralytics sets it from `device.type != "cpu" and amp`.
--autocast    the CPU autocast dtype (torch's default there is bfloat16; float16 where this torch has the kernels).
--big-weight  the stem BatchNorm's running_var[0] starts at V in the model and its EMA (above 65504: the inf case).
Records per epoch: the EMA state before and after validation, the metrics, whether the checkpoint was saved.
"""

from __future__ import annotations

import argparse
import os
import sys


def write_dataset(root, n=8, size=64):
    """n images with one or two boxes each (PNG + YOLO labels) for train and val, and the data yaml."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
        for i in range(n):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            x, y = rng.integers(8, size - 24, 2)
            image[y:y + 16, x:x + 16] = (255, 0, 0)
            Image.fromarray(image).save(os.path.join(root, "images", split, f"{i}.png"))
            with open(os.path.join(root, "labels", split, f"{i}.txt"), "w") as f:
                f.write(f"0 {(x + 8) / size:.4f} {(y + 8) / size:.4f} {16 / size:.4f} {16 / size:.4f}\n")
    data = os.path.join(root, "data.yaml")
    with open(data, "w") as f:
        f.write(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


def force_half(validator):
    """`validator.args.half` reads True (assignments ignored): the half path on the CPU."""
    cls = type(validator.args)
    validator.args.__class__ = type("AlwaysHalf", (cls,), {"half": property(lambda s: True, lambda s, v: None)})


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--root", required=True)
    parser.add_argument("--patched", action="store_true")
    parser.add_argument("--force-half", action="store_true")
    parser.add_argument("--autocast", default="default", choices=("default", "float16"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--big-weight", type=float, default=None)
    parser.add_argument("--no-val", action="store_true")
    opts = parser.parse_args(argv)
    if opts.patched:
        import shims
        shims.enable(patches=["yolo"])
    import torch
    if opts.autocast == "float16":
        setter = getattr(torch, "set_autocast_cpu_dtype", None)
        setter(torch.float16)
    torch.set_num_threads(1)
    import ultralytics
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    data = write_dataset(os.path.join(opts.root, "data"))
    record = {"version": ultralytics.__version__, "epochs": []}

    def on_train_start(trainer):
        if opts.force_half:
            force_half(trainer.validator)
        stem_bn = trainer.model.model[0].bn
        if opts.big_weight is not None:
            with torch.no_grad():
                for bn in (stem_bn, trainer.ema.ema.model[0].bn):
                    bn.running_var[0] = opts.big_weight
        validate, save_model = trainer.validate, trainer.save_model

        def state():
            return {k: v.detach().clone() for k, v in trainer.ema.ema.state_dict().items()}

        def validate_recorded():
            entry = {"ema_before": state(), "model_before": {k: v.detach().clone()
                                                              for k, v in trainer.model.state_dict().items()}}
            metrics, fitness = validate()
            entry.update(ema_after=state(), metrics=dict(metrics or {}), fitness=fitness,
                         stem_var_after=float(trainer.ema.ema.model[0].bn.running_var[0]))
            record["epochs"].append(entry)
            return metrics, fitness

        def save_recorded():
            saved = save_model()
            if record["epochs"] and "saved" not in record["epochs"][-1]:  # epochs without validation: not recorded
                record["epochs"][-1]["saved"] = bool(saved)
            return saved

        trainer.validate, trainer.save_model = validate_recorded, save_recorded

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_start", on_train_start)
    try:
        model.train(data=data, epochs=opts.epochs, imgsz=64, batch=4, nbs=4, workers=0, device="cpu", seed=0,
                    deterministic=True, plots=False, val=not opts.no_val, project=os.path.join(opts.root, "runs"),
                    name="train", exist_ok=True, verbose=False, amp=False, warmup_epochs=0)
    except FileNotFoundError as exc:  # ultralytics >= 8.4: "Training completed but no checkpoint was saved"
        record["train_error"] = str(exc)
    last = os.path.join(opts.root, "runs", "train", "weights", "last.pt")
    record["last_saved"] = os.path.exists(last)
    record["final_model"] = {k: v.detach().clone() for k, v in model.trainer.model.state_dict().items()}
    if opts.patched:
        import shims
        record["receipt"] = shims.status()["patches"]["yolo"]
    torch.save(record, opts.out)


if __name__ == "__main__":
    sys.exit(main())
