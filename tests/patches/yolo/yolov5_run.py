"""YOLOv5's `val.run` as train.py calls it (model=EMA, half=amp, compute_loss), on the CPU, recorded (a subprocess of
tests/patches/yolo/test_yolov5.py; the `yolov5` package first on PYTHONPATH).

    python yolov5_run.py OUT.pt --root DIR --variant {package,clone,fixed} [--patched] [--half-path]

package    yolov5.val.run as released (7.0.14): on the CPU `half &= device.type != 'cpu'` turns half off
clone      the same source as a clone's top-level `val` module (written into DIR); with --half-path its CPU check
           reads True (the stand-in for CUDA), so `model.half()` runs on the CPU
fixed      the clone with PR #24731's change made in the text by this script (ultralytics' fix; YOLOv5 has none):
           `model.float()` instead of the cast, inference and loss under `torch.autocast(device.type, enabled=half)`
"""

from __future__ import annotations

import argparse
import os
import sys

CPU_CHECK = "half &= device.type != 'cpu'  # half precision only supported on CUDA\n"
CAST = "model.half() if half else model.float()"
INFERENCE = "            preds, train_out = model(im) if compute_loss else (model(im, augment=augment), None)\n"
LOSS = "            loss += compute_loss(train_out, targets)[1]  # box, obj, cls\n"


def in_autocast(line):
    return "            with torch.autocast(device.type, enabled=half):\n    " + line


def write_clone(root, half_path, fixed):
    import yolov5.val
    with open(yolov5.val.__file__) as f:
        source = f.read()
    edits = [(CPU_CHECK, "half &= True  # the test's stand-in for CUDA\n")] if half_path else []
    if fixed:
        edits += [(CAST, "model.float()"), (INFERENCE, in_autocast(INFERENCE)), (LOSS, in_autocast(LOSS))]
    for old, new in edits:
        assert source.count(old) == 1, f"yolov5/val.py has {source.count(old)} copies of {old!r}"
        source = source.replace(old, new)
    os.makedirs(os.path.join(root, "clone"), exist_ok=True)
    with open(os.path.join(root, "clone", "val.py"), "w") as f:
        f.write(source)
    sys.path.insert(0, os.path.join(root, "clone"))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--root", required=True)
    parser.add_argument("--variant", choices=("package", "clone", "fixed"), default="package")
    parser.add_argument("--patched", action="store_true")
    parser.add_argument("--half-path", action="store_true")
    opts = parser.parse_args(argv)
    if opts.patched:
        import shims
        shims.enable(patches=["yolo"])
    import numpy as np
    import torch
    import yaml
    if not hasattr(np, "trapz"):  # yolov5 7.0.14 predates numpy 2.x, which renamed np.trapz to np.trapezoid
        np.trapz = np.trapezoid
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from tests.patches.yolo.ultralytics_run import write_dataset
    import yolov5
    from yolov5.models.yolo import Model
    from yolov5.utils.dataloaders import create_dataloader
    from yolov5.utils.loss import ComputeLoss
    from yolov5.utils.torch_utils import ModelEMA

    if opts.variant == "package":
        from yolov5.val import run
    else:
        write_clone(opts.root, opts.half_path, opts.variant == "fixed")
        from val import run
    package = os.path.dirname(yolov5.__file__)
    data_dir = os.path.join(opts.root, "data")
    write_dataset(data_dir)
    model = Model(os.path.join(package, "models", "yolov5n.yaml"), ch=3, nc=1)
    with open(os.path.join(package, "data", "hyps", "hyp.scratch-low.yaml")) as f:
        model.hyp = yaml.safe_load(f)
    model.nc, model.names = 1, {0: "box"}
    ema = ModelEMA(model)
    loader = create_dataloader(os.path.join(data_dir, "images", "val"), 64, 4, 32, pad=0.5, rect=True, workers=0)[0]
    state = lambda: {k: v.detach().clone() for k, v in ema.ema.state_dict().items()}  # noqa: E731
    before = state()
    results = run(dict(nc=1, names={0: "box"}, val=loader.dataset.im_files), batch_size=4, imgsz=64, half=True,
                  model=ema.ema, single_cls=False, dataloader=loader, save_dir=__import__("pathlib").Path(opts.root),
                  plots=False, compute_loss=ComputeLoss(model))
    record = {"before": before, "after": state(), "results": results[0], "maps": results[1].tolist()}
    if opts.patched:
        import shims
        record["receipt"] = shims.status()["patches"]["yolo"]
    torch.save(record, opts.out)


if __name__ == "__main__":
    sys.exit(main())
