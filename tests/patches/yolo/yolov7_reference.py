"""YOLOv7's `test.test`, the training-time path, written here in our own words (YOLOv7 has no package).

`test` follows the structure of WongKinYiu/yolov7 `test.py` (a207844) when train.py calls it with `model=ema.ema`:
the device is read from the model's parameters, `half = device.type != 'cpu' and half_precision` (half_precision is
True by default), `if half: model.half()`, `model.eval()`; each batch is moved to the device and cast with `.half()`
when half, divided by 255; under no_grad the model returns (inference output, training output), the loss is computed
on the training output cast to float32, the inference output goes through NMS; statistics per image; at the end
`model.float()` "for training". `test_fixed` is the same loop with ultralytics' fix (PR #24731) written in: the model
stays float32, inference and loss run under `torch.autocast(device.type, enabled=half)`.

`ACCELERATOR` is the tests' stand-in for CUDA: the device types that count as "not the CPU" (the upstream check is
`device.type != 'cpu'`; the tests add "cpu" to it to take the half path on the CPU).
Also here: a small YOLO-shaped detector with BatchNorm (`TinyDetector`), its loss and synthetic batches.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ACCELERATOR = set()  # device types taken for an accelerator besides every non-CPU one (the tests' stand-in)


def _on_accelerator(device):
    return device.type != "cpu" or device.type in ACCELERATOR


def test(data, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, model=None, dataloader=None,
         compute_loss=None, half_precision=True):
    device = next(model.parameters()).device
    half = _on_accelerator(device) and half_precision
    if half:
        model.half()
    model.eval()
    seen, stats = 0, []
    loss = torch.zeros(3, device=device)
    for img, targets in dataloader:
        img = img.to(device, non_blocking=True)
        img = img.half() if half else img.float()
        img /= 255.0
        targets = targets.to(device)
        with torch.no_grad():
            out, train_out = model(img)
            if compute_loss:
                loss += compute_loss([x.float() for x in train_out], targets)[1][:3]
            out = non_max_suppression(out, conf_thres, iou_thres)
        for si, pred in enumerate(out):
            seen += 1
            labels = targets[targets[:, 0] == si, 1:]
            stats.append((pred[:, 4].float().cpu(), pred[:, 5].cpu(), labels[:, 0].cpu()))
    model.float()
    return (seen, *(loss.cpu() / len(dataloader)).tolist()), stats


def test_fixed(data, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, model=None, dataloader=None,
               compute_loss=None, half_precision=True):
    device = next(model.parameters()).device
    half = _on_accelerator(device) and half_precision
    model.float()
    model.eval()
    seen, stats = 0, []
    loss = torch.zeros(3, device=device)
    for img, targets in dataloader:
        img = img.to(device, non_blocking=True)
        img = img.half() if half else img.float()
        img /= 255.0
        targets = targets.to(device)
        with torch.no_grad():
            with torch.autocast(device.type, enabled=half):
                out, train_out = model(img)
            if compute_loss:
                with torch.autocast(device.type, enabled=half):
                    loss += compute_loss([x.float() for x in train_out], targets)[1][:3]
            out = non_max_suppression(out, conf_thres, iou_thres)
        for si, pred in enumerate(out):
            seen += 1
            labels = targets[targets[:, 0] == si, 1:]
            stats.append((pred[:, 4].float().cpu(), pred[:, 5].cpu(), labels[:, 0].cpu()))
    model.float()
    return (seen, *(loss.cpu() / len(dataloader)).tolist()), stats


def non_max_suppression(prediction, conf_thres, iou_thres):
    """Per image: boxes (cx, cy, w, h) x objectness x class scores -> (x1, y1, x2, y2, conf, class) after NMS."""
    output = []
    for x in prediction:
        x = x.float()
        scores, classes = (x[:, 5:] * x[:, 4:5]).max(1)
        keep = scores > conf_thres
        x, scores, classes = x[keep], scores[keep], classes[keep]
        boxes = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
        kept = torchvision.ops.batched_nms(boxes, scores, classes, iou_thres)
        output.append(torch.cat((boxes[kept], scores[kept, None], classes[kept, None].float()), 1))
    return output


class TinyDetector(nn.Module):
    """Conv-BN-SiLU stages and a 1x1 head per cell: eval returns (flattened predictions, [head map])."""

    def __init__(self, num_classes=2, width=8):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.SiLU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 5 + num_classes, 1)

    def forward(self, x):
        raw = self.head(self.body(x))
        b, c, h, w = raw.shape
        pred = raw.permute(0, 2, 3, 1).reshape(b, h * w, c).sigmoid() * 1.0
        scale = torch.tensor([x.shape[3], x.shape[2], x.shape[3], x.shape[2]], device=x.device, dtype=pred.dtype)
        pred = torch.cat((pred[..., :4] * scale, pred[..., 4:]), -1)
        return (pred, [raw]) if not self.training else [raw]


def tiny_loss(train_out, targets):
    """A stand-in for ComputeLoss's return shape: (total, (box, obj, cls))."""
    raw = train_out[0]
    box, obj, cls = raw[:, :4].pow(2).mean(), raw[:, 4].sigmoid().mean(), raw[:, 5:].logsumexp(1).mean()
    parts = torch.stack((box, obj, cls)) * (1 + targets[:, 1:].sum() * 0)
    return parts.sum(), parts.detach()


def batches(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [1, 0, 0.3, 0.3, 0.1, 0.1]])
        out.append((img, targets))
    return out
