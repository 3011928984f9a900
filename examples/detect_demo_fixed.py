"""examples/detect_demo.py with every fix the doctor names applied: `python -m shims doctor --fail-on any` passes on
this script and fails on detect_demo.py (tests/detect/test_doctor_cli.py runs both).

    1. the stray forward before zero_grad is deleted;
    2. evaluate() runs under torch.no_grad();
    3. the fp16 evaluation runs under autocast with float32 weights instead of model.half() (where this torch has
       float16 autocast on the device; else it is left out, as the demo leaves it out without float16 kernels);
    4. the gradient reducer uses post-accumulate-grad hooks (torch >= 2.1), which never fire inside autograd.grad;
    5. the convolution feeding BatchNorm has no bias.
Same data, model shape and optimizer as the demo.
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from detect_demo import TinyRecognizer, adaptive_weight, synthetic


class FixedRecognizer(TinyRecognizer):
    def __init__(self, classes=10):
        super().__init__(classes)
        self.features[0] = nn.Conv2d(1, 8, 3, padding=1, bias=False)  # BatchNorm2d follows: a bias would cancel


class GradientReducer:
    """Queues each parameter's gradient once it is accumulated into .grad (never for torch.autograd.grad)."""

    def __init__(self, model):
        self.queued = 0
        if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):  # torch >= 2.1
            for param in model.parameters():
                param.register_post_accumulate_grad_hook(self.queue)

    def queue(self, param):
        self.queued += 1


def fit_one_epoch(model, train_loader, batch_transforms, optimizer, scheduler):
    model.train()
    epoch_loss = 0.0
    for images, targets in train_loader:
        images = batch_transforms(images)
        optimizer.zero_grad()
        out = model(images, targets)
        smooth = -F.log_softmax(out["logits"], dim=1).mean()
        train_loss = out["loss"] + adaptive_weight(smooth, out["loss"], model.head[1].weight) * 0.1 * smooth
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
        optimizer.step()
        scheduler.step()
        epoch_loss += train_loss.item()
    return epoch_loss / len(train_loader)


@torch.no_grad()
def evaluate(model, val_loader, fp16=False):
    model.eval()
    correct = total = 0
    for images, targets in val_loader:
        # torch 2.0-2.2 refuse float16 CPU autocast even disabled: enter it only for the fp16 evaluation
        with torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext():
            logits = model(images)["logits"]
        correct += int((logits.argmax(1) == targets).sum())
        total += len(targets)
    return correct / total


def float16_autocast_runs_on_this_cpu():
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            return FixedRecognizer().eval()(torch.zeros(1, 1, 8, 32))["logits"].dtype == torch.float16
    except (RuntimeError, TypeError, ValueError):
        return False


def main(args):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_loader = torch.utils.data.DataLoader(synthetic(96, 1), batch_size=8, shuffle=True)
    val_loader = torch.utils.data.DataLoader(synthetic(32, 2), batch_size=8)
    model = FixedRecognizer()
    reducer = GradientReducer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.epochs * 12)
    for epoch in range(args.epochs):
        loss = fit_one_epoch(model, train_loader, lambda x: (x - 0.5) / 0.5, optimizer, scheduler)
        accuracy = evaluate(model, val_loader)
        print(f"epoch {epoch + 1}: loss {loss:.4f}, accuracy {accuracy:.3f}")
    fp16 = "n/a (no float16 autocast on this CPU)"
    if float16_autocast_runs_on_this_cpu():
        fp16 = f"{evaluate(model, val_loader, fp16=True):.3f}"
    print(f"fp16 accuracy {fp16}; reducer queued {reducer.queued} gradients")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    main(parser.parse_args())
