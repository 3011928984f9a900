"""A small training script with several known mistakes, for `python -m shims doctor` (docs/detect.md shows its report).

    python examples/detect_demo.py                       # trains, evaluates, prints losses
    python -m shims doctor examples/detect_demo.py       # the same run, unchanged, plus the table of findings
    --save weights.pt                                     # write the final state_dict (the bitwise test uses it)

The mistakes, each one the shape of a real upstream bug (rewritten here, offline, on synthetic data):
  1. fit_one_epoch runs the model once more than needed, before zero_grad (doctr #1861, fixed by PR #1862);
  2. evaluate() runs the model in eval mode without torch.no_grad() (an evaluation that builds autograd graphs);
  3. the final fp16 evaluation calls model.half() (RF-DETR <= 1.5 fp16_eval, rf-detr #117);
  4. a gradient "reducer" uses tensor hooks on parameters while the loss takes torch.autograd.grad for an adaptive
     weight (the VQGAN pattern of ColossalAI #5601).
It also reads loss.item() every step and uses DataLoader(num_workers=0): harmless on CPU, findings on a GPU.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class TinyRecognizer(nn.Module):
    """Recognition-model shaped: model(images, targets) -> {"loss", "logits"}, with BatchNorm and dropout."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d((1, 8)), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, classes))

    def forward(self, images, targets=None):
        logits = self.head(self.features(images))
        out = {"logits": logits}
        if targets is not None:
            out["loss"] = F.cross_entropy(logits, targets)
        return out


class GradientReducer:
    """Queues each parameter's gradient when its tensor hook fires (how ZeRO-style optimizers did it before
    ColossalAI PR #5596 moved to post-accumulate-grad hooks)."""

    def __init__(self, model):
        self.queued = 0
        for param in model.parameters():
            param.register_hook(self.queue)

    def queue(self, grad):
        self.queued += 1
        return grad


def adaptive_weight(loss, reference_loss, last_layer):
    """VQGAN-style balance between two losses, from their gradients at the last layer."""
    grad = torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
    reference = torch.autograd.grad(reference_loss, last_layer, retain_graph=True)[0]
    return (reference.norm() / (grad.norm() + 1e-4)).clamp(0, 10).detach()


def fit_one_epoch(model, train_loader, batch_transforms, optimizer, scheduler):
    model.train()
    epoch_loss = 0.0
    for images, targets in train_loader:
        images = batch_transforms(images)

        train_loss = model(images, targets)["loss"]

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


def evaluate(model, val_loader, fp16=False):
    model.eval()
    if fp16:
        model.half()
    correct = total = 0
    for images, targets in val_loader:
        if fp16:
            images = images.half()
        logits = model(images)["logits"]
        correct += int((logits.argmax(1) == targets).sum())
        total += len(targets)
    return correct / total


def float16_runs_on_this_cpu():
    """Older CPU builds of torch (2.0-2.2 here) have no float16 convolution, batch norm or matmul: then the fp16
    evaluation is left out (on a GPU it runs everywhere). Zeros only: no random numbers drawn."""
    half = torch.float16
    try:
        x = F.conv2d(torch.zeros(1, 1, 2, 2, dtype=half), torch.zeros(1, 1, 1, 1, dtype=half))
        x = F.batch_norm(x, torch.zeros(1, dtype=half), torch.ones(1, dtype=half), training=False)
        F.linear(x.flatten(1), torch.zeros(2, 4, dtype=half))
        return True
    except RuntimeError:
        return False


def synthetic(n, seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randn(n, 1, 8, 32, generator=generator) * 0.5 + targets.view(-1, 1, 1, 1) / 10
    return torch.utils.data.TensorDataset(images, targets)


def main(args):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_loader = torch.utils.data.DataLoader(synthetic(96, 1), batch_size=8, shuffle=True)
    val_loader = torch.utils.data.DataLoader(synthetic(32, 2), batch_size=8)
    model = TinyRecognizer()
    reducer = GradientReducer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.epochs * 12)
    for epoch in range(args.epochs):
        loss = fit_one_epoch(model, train_loader, lambda x: (x - 0.5) / 0.5, optimizer, scheduler)
        accuracy = evaluate(model, val_loader)
        print(f"epoch {epoch + 1}: loss {loss:.4f}, accuracy {accuracy:.3f}")
    fp16 = "n/a (no float16 on this CPU)"
    if float16_runs_on_this_cpu():
        fp16 = f"{evaluate(model, val_loader, fp16=True):.3f}"
    print(f"fp16 accuracy {fp16}; reducer queued {reducer.queued} gradients")
    if args.save:
        torch.save(model.state_dict(), args.save)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--save", default=None, help="write the final state_dict here")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
