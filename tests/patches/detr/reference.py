"""Reference code for the detr patch tests, written here in our own words.

`evaluate` follows the structure of LW-DETR's `engine.evaluate` (Atten4Vis/LW-DETR): decorated with no_grad, puts
the model in eval mode, converts it with `.half()` when `args.fp16_eval` is set (and never back), casts each batch
with `.half()`, runs the forward WITHOUT autocast, casts every output back to float32, then criterion, postprocessor
and a COCO evaluator. The shims detr patch finds this module through SHIMS_DETR_MODULES=tests.patches.detr.reference.

Also here: a small DETR-shaped detector on a timm backbone with BatchNorm and LayerNorm (`TimmDetector`), its
criterion and postprocessor, a synthetic COCO ground truth, and the helpers that build RF-DETR Nano on synthetic
data for the real-framework tests (`build_rfdetr_nano`, `write_coco_dataset`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import torch
from torch import nn

IMAGE_SIZE = 64  # RF-DETR Nano needs height and width divisible by 32; timm mobilevit needs the same


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, args=None):
    model.eval()
    if args.fp16_eval:
        model.half()
    criterion.eval()
    evaluator = SmallCocoEvaluator(base_ds)
    losses = []
    for images, targets in data_loader:
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        if args.fp16_eval:
            images = images.half()
        outputs = model(images)
        if args.fp16_eval:
            for key in outputs:
                if key == "aux_outputs":
                    for layer in range(len(outputs[key])):
                        for name in outputs[key][layer]:
                            outputs[key][layer][name] = outputs[key][layer][name].float()
                else:
                    outputs[key] = outputs[key].float()
        loss_dict = criterion(outputs, targets)
        losses.append(sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict).item())
        sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, sizes)
        evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})
    stats = {"loss": sum(losses) / len(losses), "coco_eval_bbox": evaluator.summarize()}
    return stats, evaluator


class TimmDetector(nn.Module):
    """A DETR-shaped head on timm's mobilevit_xxs (BatchNorm in its convolutions, LayerNorm in its transformers)."""

    def __init__(self, num_queries=5, num_classes=2):
        super().__init__()
        import timm
        self.num_queries, self.num_classes = num_queries, num_classes
        self.backbone = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0)
        width = self.backbone.num_features
        self.norm = nn.LayerNorm(width)
        self.class_head = nn.Linear(width, num_queries * (num_classes + 1))
        self.box_head = nn.Linear(width, num_queries * 4)
        self.aux_class_head = nn.Linear(width, num_queries * (num_classes + 1))

    def forward(self, images):
        features = self.norm(self.backbone(images))
        batch = images.shape[0]
        logits = self.class_head(features).view(batch, self.num_queries, self.num_classes + 1)
        boxes = self.box_head(features).view(batch, self.num_queries, 4).sigmoid()
        aux_logits = self.aux_class_head(features).view(batch, self.num_queries, self.num_classes + 1)
        return {"pred_logits": logits, "pred_boxes": boxes,
                "aux_outputs": [{"pred_logits": aux_logits, "pred_boxes": boxes}]}


class FirstQueryCriterion(nn.Module):
    """Cross-entropy and L1 of the first query against each image's first box (no matcher: enough for fidelity).

    Records the dtype of every output tensor it receives (`seen_dtypes`)."""

    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0}  # noqa: RUF012 - read-only, as in DETR's SetCriterion

    def __init__(self):
        super().__init__()
        self.seen_dtypes = set()

    def forward(self, outputs, targets):
        self.seen_dtypes.update(v.dtype for v in outputs.values() if torch.is_tensor(v))
        labels = torch.stack([t["labels"][0] for t in targets])
        boxes = torch.stack([t["boxes"][0] for t in targets])
        loss_ce = nn.functional.cross_entropy(outputs["pred_logits"][:, 0], labels)
        loss_bbox = (outputs["pred_boxes"][:, 0] - boxes).abs().mean()
        for aux in outputs.get("aux_outputs", ()):
            loss_ce = loss_ce + nn.functional.cross_entropy(aux["pred_logits"][:, 0], labels)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox}


class BoxPostProcess(nn.Module):
    """Scores, labels and absolute xyxy boxes per image, like DETR's PostProcess. Records input dtypes."""

    def __init__(self):
        super().__init__()
        self.seen_dtypes = set()

    def forward(self, outputs, target_sizes):
        self.seen_dtypes.update({outputs["pred_logits"].dtype, outputs["pred_boxes"].dtype})
        probs = outputs["pred_logits"].softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        cx, cy, w, h = outputs["pred_boxes"].unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        height, width = target_sizes.unbind(1)
        xyxy = xyxy * torch.stack([width, height, width, height], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


class SmallCocoEvaluator:
    """pycocotools COCOeval on the accumulated detections (bbox only)."""

    def __init__(self, coco_gt):
        self.coco_gt, self.detections = coco_gt, []

    def update(self, results):
        for image_id, result in results.items():
            for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                         result["boxes"].tolist()):
                x0, y0, x1, y1 = box
                self.detections.append({"image_id": image_id, "category_id": label, "score": score,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0]})

    def summarize(self):
        from pycocotools.cocoeval import COCOeval
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(self.detections)
            coco_eval = COCOeval(self.coco_gt, coco_dt, "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval.stats.tolist()


def synthetic_annotations(num_images=3, size=IMAGE_SIZE, seed=0):
    """A COCO dict: `num_images` images of size x size, one or two boxes each, categories 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    for image_id in range(num_images):
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "height": size, "width": size})
        for box_index in range(1 + image_id % 2):
            x, y = (torch.rand(2, generator=generator) * size / 2).tolist()
            w, h = (8 + torch.rand(2, generator=generator) * size / 3).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 - box_index % 2,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": 0, "name": "zero"}, {"id": 1, "name": "one"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_from_dict(dataset):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(dataset))
        coco.createIndex()
    return coco


def reference_batches(dataset, batch_size=2, seed=1):
    """(images, targets) batches for `evaluate` and training steps: random images, targets as DETR expects."""
    generator = torch.Generator().manual_seed(seed)
    by_image = {}
    for ann in dataset["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    batches = []
    images_meta = dataset["images"]
    for start in range(0, len(images_meta), batch_size):
        chunk = images_meta[start:start + batch_size]
        images = torch.rand(len(chunk), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        targets = []
        for meta in chunk:
            anns = by_image[meta["id"]]
            boxes = torch.tensor([[(a["bbox"][0] + a["bbox"][2] / 2) / meta["width"],
                                   (a["bbox"][1] + a["bbox"][3] / 2) / meta["height"],
                                   a["bbox"][2] / meta["width"], a["bbox"][3] / meta["height"]] for a in anns])
            targets.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
                            "image_id": torch.tensor(meta["id"]),
                            "orig_size": torch.tensor([meta["height"], meta["width"]])})
        batches.append((images, targets))
    return batches


def train_step(model, criterion, optimizer, images, targets, seed=0, pass_targets=False):
    """One training step as a DETR training loop takes it (train mode, weighted loss sum, backward, step).

    pass_targets: RF-DETR's forward takes the targets in training (for its denoising queries)."""
    torch.manual_seed(seed)
    model.train()
    criterion.train()
    outputs = model(images, targets) if pass_targets else model(images)
    loss_dict = criterion(outputs, targets)
    loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------- RF-DETR on synthetic data


def write_coco_dataset(root, num_images=3, size=IMAGE_SIZE, seed=0):
    """A Roboflow-layout COCO dataset (`valid/` images and `_annotations.coco.json`) under `root`; returns root."""
    from PIL import Image
    dataset = synthetic_annotations(num_images, size, seed)
    folder = os.path.join(str(root), "valid")
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for meta in dataset["images"]:
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, meta["file_name"]))
    with open(os.path.join(folder, "_annotations.coco.json"), "w") as f:
        json.dump(dataset, f)
    return str(root)


def build_rfdetr_nano(dataset_root, seed=0, resolution=IMAGE_SIZE):
    """(model, criterion, postprocess, data_loader, base_ds, args) for RF-DETR Nano, random init, no download."""
    from rfdetr import RFDETRNano
    from rfdetr.datasets import get_coco_api_from_dataset
    from rfdetr.datasets.coco import build_roboflow_from_coco
    from rfdetr.models import build_criterion_and_postprocessors
    from rfdetr.util.misc import collate_fn

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        wrapper = RFDETRNano(pretrain_weights=None, device="cpu", num_classes=2, resolution=resolution,
                             num_queries=10, num_select=10)
    model, args = wrapper.model.model, wrapper.model.args
    args.dataset_dir = dataset_root
    args.square_resize_div_64 = True  # resize to exactly `resolution` (the default keeps up to 1333 px)
    args.eval_max_dets = 100  # read by evaluate; set by rfdetr's TrainConfig, not by populate_args
    args.print_freq = 1000
    dataset = build_roboflow_from_coco("val", args, resolution)
    base_ds = get_coco_api_from_dataset(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate_fn)  # one batch
    criterion, postprocess = build_criterion_and_postprocessors(args)
    return model, criterion, postprocess, loader, base_ds, args
