"""One rank of the ddp patch's distributed tests: gloo on 127.0.0.1, CPU, torch.set_num_threads(1).

    python tests/patches/ddp/workers.py SCENARIO --rank R --world 2 --port P --out DIR [--shims] [options]

`--shims` makes the worker start shims the way a user does (`import shims.auto`, configured by the SHIMS_* variables
of its environment), before torch is imported. Each rank writes DIR/rank{R}.json (flags DDP was built with, steps
done, the error if any, the ddp receipt) and DIR/rank{R}.pt (final parameters). `launch()` runs both ranks with a
hard timeout and kills them if it passes: nothing here can hang CI.

Scenarios
    damo     DAMO-YOLO-style training (damo/detectors/detector.py + damo/apis/detector_trainer.py written by
             `write_damo_layout` into --root): an ultralytics YOLOv8n built from its yaml, then a timm model.
    toy      a small MLP whose parameter `extra` is used always (--unused none), never (const), only on even steps
             (change); DDP built by `build_ddp` in this script, with find_unused_parameters as --as-written says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

# ---------------------------------------------------------------------------------------------------- DAMO layout

# damo/detectors/detector.py: the module layout and the DDP call of tinyvision/DAMO-YOLO's detector.py (there:
# device_ids=[local_rank], output_device=local_rank, broadcast_buffers=False, find_unused_parameters=True), in our
# own words; the Detector computes its losses in forward like DAMO's ZeroHead, with zero-weighted box terms when a
# batch has no positive sample, so every parameter stays in the graph.
DAMO_DETECTOR = '''
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class Detector(nn.Module):
    """A network plus DAMO-style losses computed in forward: a dict with total_loss."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, images, targets):
        out = self.net(images)
        if self.kind == "timm":
            loss_cls = nn.functional.cross_entropy(out, targets)
            return dict(total_loss=loss_cls, loss_cls=loss_cls)
        if isinstance(out, dict):  # ultralytics 8.4: the head's training output, already split
            scores, boxes = out["scores"], out["boxes"]  # (B, classes, anchors), (B, 4 * reg_max, anchors)
        else:  # older ultralytics: one (B, 4 * reg_max + classes, H, W) map per level
            head = self.net.model[-1]
            flat = torch.cat([level.flatten(2) for level in out], 2)
            boxes, scores = flat.split((4 * head.reg_max, head.nc), 1)
        labels = targets  # (B, anchors): class index, or -1 for background
        onehot = torch.zeros_like(scores)
        positive = labels >= 0
        onehot.scatter_(1, labels.clamp(min=0).unsqueeze(1), positive.unsqueeze(1).to(scores.dtype))
        loss_cls = nn.functional.binary_cross_entropy_with_logits(scores, onehot)
        if positive.any():
            picked = boxes.permute(0, 2, 1)[positive]
            loss_bbox = nn.functional.smooth_l1_loss(picked, torch.full_like(picked, 0.25))
        else:
            loss_bbox = boxes.sum() * 0.0  # no positive sample: keep the box branch in the graph, with no weight
        return dict(total_loss=loss_cls + loss_bbox, loss_cls=loss_cls, loss_bbox=loss_bbox)


def build_local_model(kind, device="cpu"):
    torch.manual_seed(0)
    if kind == "yolo":
        from ultralytics.nn.tasks import DetectionModel
        net = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    else:
        import timm
        net = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    return Detector(net, kind).to(device)


def build_ddp_model(model, local_rank):
    on_cuda = next(model.parameters()).is_cuda  # upstream runs on CUDA; on CPU DDP takes no device ids
    model = DDP(model,
                device_ids=[local_rank] if on_cuda else None,
                output_device=local_rank if on_cuda else None,
                broadcast_buffers=False,
                find_unused_parameters=True)
    return model
'''

# damo/apis/detector_trainer.py: Trainer.train builds the DDP model first, then per batch: lr from a schedule,
# forward returning the loss dict, zero_grad, backward, step (the order of DAMO-YOLO's Trainer.train).
DAMO_TRAINER = '''
import math

import torch

from damo.detectors.detector import build_ddp_model, build_local_model


class Trainer:
    def __init__(self, kind, batches, base_lr=0.01):
        self.model = build_local_model(kind)
        self.batches = batches
        self.base_lr = base_lr
        bn, weight, bias = [], [], []
        for name, module in self.model.named_modules():
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                bias.append(module.bias)
            if isinstance(module, torch.nn.BatchNorm2d):
                bn.append(module.weight)
            elif isinstance(getattr(module, "weight", None), torch.nn.Parameter):
                weight.append(module.weight)
        self.optimizer = torch.optim.SGD(bn, lr=base_lr, momentum=0.9, nesterov=True)
        self.optimizer.add_param_group({"params": weight, "weight_decay": 5e-4})
        self.optimizer.add_param_group({"params": bias})

    def lr(self, it):
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * it / len(self.batches)))

    def train(self, local_rank):
        self.model = build_ddp_model(self.model, local_rank)
        self.model.train()
        for it, (inps, targets) in enumerate(self.batches):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(it)
            outputs = self.model(inps, targets)
            loss = outputs["total_loss"]
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return self.model
'''


def write_damo_layout(root):
    """Write the damo package (damo/detectors/detector.py, damo/apis/detector_trainer.py) under `root`."""
    files = {"damo/__init__.py": "", "damo/detectors/__init__.py": "", "damo/apis/__init__.py": "",
             "damo/detectors/detector.py": DAMO_DETECTOR, "damo/apis/detector_trainer.py": DAMO_TRAINER}
    for rel, text in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
    return str(root)


# ---------------------------------------------------------------------------------------------------- launching


class Ranks:
    """What the ranks of one launch left behind: returncodes, stdout/stderr, rank{R}.json, and the out folder."""

    def __init__(self, out, procs, outputs, timed_out):
        self.out, self.timed_out = out, timed_out
        self.returncodes = [p.returncode for p in procs]
        self.stdout = [o[0] for o in outputs]
        self.stderr = [o[1] for o in outputs]
        self.results = []
        for rank in range(len(procs)):
            path = os.path.join(out, f"rank{rank}.json")
            self.results.append(json.load(open(path)) if os.path.exists(path) else None)

    def params(self, rank):
        import torch
        return torch.load(os.path.join(self.out, f"rank{rank}.pt"))

    def describe(self):
        parts = [f"timed_out={self.timed_out} returncodes={self.returncodes}"]
        for rank, (out, err) in enumerate(zip(self.stdout, self.stderr)):
            error = (self.results[rank] or {}).get("error")  # what the worker caught (exit code 3) is only here
            parts.append(f"--- rank {rank} error: {error}\n--- rank {rank} stdout\n{out[-3000:]}"
                         f"\n--- rank {rank} stderr\n{err[-5000:]}")
        return "\n".join(parts)


def launch(scenario, out, *, envs, args=(), timeout=150, world=2, script="workers.py"):
    """Run `world` ranks of SCENARIO (of `script`, in this folder), rank r with environment envs[r]; kill them all
    when `timeout` passes."""
    os.makedirs(out, exist_ok=True)
    from tests.conftest import free_port  # here, in the launching test process (ranks never import it)
    port = free_port()
    procs = []
    for rank in range(world):
        cmd = [sys.executable, os.path.join(HERE, script), scenario, "--rank", str(rank), "--world",
               str(world), "--port", str(port), "--out", str(out), *args]
        procs.append(subprocess.Popen(cmd, env=envs[rank], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO))
    deadline = time.monotonic() + timeout
    outputs, timed_out = [], False
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in procs:
                other.kill()
            outputs.append(proc.communicate())
    return Ranks(str(out), procs, outputs, timed_out)


# ---------------------------------------------------------------------------------------------------- the worker


def build_ddp(model, **kwargs):
    """The call site of the toy scenarios (`__main__:build_ddp` in the receipt)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, **kwargs)


def toy_model(torch):
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
            self.extra = nn.Linear(16, 16)
            self.head = nn.Linear(16, 2)
            self.use_extra = lambda step: True

        def forward(self, x, step):
            h = self.body(x)
            if self.use_extra(step):
                h = self.extra(h)
            return self.head(h)

    torch.manual_seed(0)
    return Toy()


def run_toy(torch, rank, case, result):
    """Train the toy with DDP built at `build_ddp`; returns the DDP object (or raises what training raised)."""
    model = toy_model(torch)
    model.use_extra = {"none": lambda s: True, "const": lambda s: False,
                       "change": lambda s: s % 2 == 0}[case.get("unused", "none")]
    as_written = case.get("as_written", ["true", "true"])[rank] == "true"
    ddp = build_ddp(model, find_unused_parameters=as_written, static_graph=case.get("static_graph", False))
    result.update(find_unused_parameters=ddp.find_unused_parameters, static_graph=bool(ddp.static_graph))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(case.get("steps", 4)):
        if case.get("accumulate"):  # gradient accumulation: a first micro-batch whose backward skips the all-reduce
            with ddp.no_sync():
                x, y = torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
                torch.nn.functional.cross_entropy(ddp(x, step), y).backward()
        x, y = torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x, step), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result["steps_done"] = step + 1
    return ddp


def run_cases(torch, opts):
    """Each case: configure shims in-process (as SHIMS_* variables would, per rank if the case says so), train the
    toy, record what happened. Returns ({case: result}, {case: final parameters})."""
    import datetime

    import torch.distributed as dist

    import shims
    from shims import engine
    results, states = {}, {}
    for case in json.loads(opts.cases):
        engine.reset()
        for key in [k for k in os.environ if k.startswith("SHIMS_")]:
            del os.environ[key]  # enable() exports its variables for child processes: start each case from none
        result = {"steps_done": 0, "error": None}
        if case.get("shims", True):
            options = dict(case.get("options", {}))
            options.update(case.get("per_rank", {}).get(str(opts.rank), {}))
            shims.enable(patches=["ddp"], mode=case.get("mode", "fix"), strict=case.get("strict", False),
                         options=options)
        try:
            ddp = run_toy(torch, opts.rank, case, result)
            states[case["name"]] = {k: v.detach().clone() for k, v in ddp.module.named_parameters()}
            finish_observations()
        except Exception as exc:  # noqa: BLE001 - recorded for the test, which decides what was expected
            result["error"] = describe_error(exc)
        result["receipt"] = shims.status()["patches"].get("ddp") if case.get("shims", True) else None
        results[case["name"]] = result
        ddp = None
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))  # both ranks start the next case together
    engine.reset()
    return results, states


def finish_observations():
    from shims.patches.ddp.observation import finish_all
    finish_all()  # report observations cut short, as the exit hook would


def describe_error(exc):
    return {"type": type(exc).__name__, "message": str(exc), "names": list(getattr(exc, "names", ()) or ()),
            "policy": getattr(exc, "policy", None), "variable": getattr(exc, "variable", None)}


def run_damo(torch, opts, result):
    sys.path.insert(0, opts.root)
    from damo.apis.detector_trainer import Trainer
    models = {}
    for kind in opts.models.split(","):
        g = torch.Generator().manual_seed(10 + opts.rank)
        batches = []
        for step in range(opts.steps):
            if kind == "yolo":
                images = torch.rand(2, 3, 64, 64, generator=g)
                labels = torch.randint(-1, 4, (2, 84), generator=g)
                if step == 1:
                    labels.fill_(-1)  # a batch without positives: DAMO's zero-weighted terms keep the graph whole
                batches.append((images, labels))
            else:
                batches.append((torch.rand(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)))
        trainer = Trainer(kind, batches)
        ddp = trainer.train(opts.rank)
        result.setdefault("models", {})[kind] = {"find_unused_parameters": ddp.find_unused_parameters,
                                                 "static_graph": bool(ddp.static_graph)}
        models[kind] = ddp
        result["steps_done"] = opts.steps
    return models


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("cases", "toy", "damo"))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shims", action="store_true", help="import shims.auto first (SHIMS_* from the environment)")
    parser.add_argument("--cases", default="[]", help="cases: a JSON list (see run_cases)")
    parser.add_argument("--case", default="{}", help="toy: one case as JSON (unused, as_written, steps, accumulate)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--root", default="")
    parser.add_argument("--models", default="yolo,timm")
    parser.add_argument("--pg-timeout", type=float, default=60)
    opts = parser.parse_args(argv)

    if opts.shims:
        import shims.auto  # noqa: F401 - as a user's first line; configured by SHIMS_* of this environment
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{opts.port}", rank=opts.rank,
                            world_size=opts.world, timeout=datetime.timedelta(seconds=opts.pg_timeout))
    result = {"rank": opts.rank, "steps_done": 0, "error": None}
    state = {}
    code = 0
    try:
        if opts.scenario == "cases":
            result["cases"], state = run_cases(torch, opts)
        elif opts.scenario == "toy":
            ddp = run_toy(torch, opts.rank, json.loads(opts.case), result)
            state = {k: v.detach().clone() for k, v in ddp.module.named_parameters()}
        else:
            for kind, ddp in run_damo(torch, opts, result).items():
                state.update({f"{kind}.{k}": v.detach().clone() for k, v in ddp.module.named_parameters()})
    except Exception as exc:  # noqa: BLE001 - recorded for the test, which decides what was expected
        result["error"] = describe_error(exc)
        code = 3
    if opts.shims:
        import shims
        finish_observations()
        result["receipt"] = shims.status()["patches"].get("ddp")
    torch.save(state, os.path.join(opts.out, f"rank{opts.rank}.pt"))
    with open(os.path.join(opts.out, f"rank{opts.rank}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)  # after an error the other rank may be gone: do not wait on the process group at exit


if __name__ == "__main__":
    main()
