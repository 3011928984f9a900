"""A doctr-style recognition training script, laid out like doctr's references/recognition/train_pytorch.py
(<= v0.11.0): helper functions, `fit_one_epoch` WITH the stray forward of doctr issue #1861, `main`, `parse_args`.
Written here for the demo and the end-to-end tests; it trains on synthetic word images, offline.

    python examples/doctr_train.py --arch vitstr_small --steps 20           # unpatched: 2 forwards per step
    python -m shims run examples/doctr_train.py --arch vitstr_small ...     # patched: 1 forward per step
    (or add `import shims.auto` as the first line)
    --hand-fixed   train with `fit_one_epoch_hand_fixed`, the loop as upstream fixed it (PR #1862)
    --out r.json   write forwards per step, step times, epoch loss and a digest of the final weights
"""

import argparse
import hashlib
import json
import os
import time

os.environ.setdefault("USE_TORCH", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

VOCAB = "abcdefghijklmnopqrstuvwxyz"


def fit_one_epoch(model, train_loader, batch_transforms, optimizer, scheduler, amp=False, log=None):
    if amp:
        scaler = grad_scaler()

    model.train()
    epoch_loss, steps = 0.0, 0
    progress = tqdm(train_loader, dynamic_ncols=True, disable=True)
    for images, targets in progress:
        if torch.cuda.is_available():
            images = images.cuda()
        images = batch_transforms(images)

        train_loss = model(images, targets)["loss"]

        optimizer.zero_grad()
        if amp:
            with torch.autocast(AMP_DEVICE, dtype=AMP_DTYPE):
                train_loss = model(images, targets)["loss"]
            scaler.scale(train_loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
            scaler.step(optimizer)
            scaler.update()
        else:
            train_loss = model(images, targets)["loss"]
            train_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
            optimizer.step()

        scheduler.step()
        last_lr = scheduler.get_last_lr()[0]

        progress.set_description(f"Training loss: {train_loss.item():.6} | LR: {last_lr:.6}")
        log(train_loss=train_loss.item(), lr=last_lr)

        epoch_loss += train_loss.item()
        steps += 1

    epoch_loss /= steps
    return epoch_loss, last_lr


def fit_one_epoch_hand_fixed(model, train_loader, batch_transforms, optimizer, scheduler, amp=False, log=None):
    """The same loop without the stray forward: what doctr PR #1862 (commit 183cf65a52) ships."""
    if amp:
        scaler = grad_scaler()

    model.train()
    epoch_loss, steps = 0.0, 0
    progress = tqdm(train_loader, dynamic_ncols=True, disable=True)
    for images, targets in progress:
        if torch.cuda.is_available():
            images = images.cuda()
        images = batch_transforms(images)

        optimizer.zero_grad()
        if amp:
            with torch.autocast(AMP_DEVICE, dtype=AMP_DTYPE):
                train_loss = model(images, targets)["loss"]
            scaler.scale(train_loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
            scaler.step(optimizer)
            scaler.update()
        else:
            train_loss = model(images, targets)["loss"]
            train_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5)
            optimizer.step()

        scheduler.step()
        last_lr = scheduler.get_last_lr()[0]

        progress.set_description(f"Training loss: {train_loss.item():.6} | LR: {last_lr:.6}")
        log(train_loss=train_loss.item(), lr=last_lr)

        epoch_loss += train_loss.item()
        steps += 1

    epoch_loss /= steps
    return epoch_loss, last_lr


AMP_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP_DTYPE = torch.float16 if AMP_DEVICE == "cuda" else torch.bfloat16


def grad_scaler():
    """torch.amp.GradScaler(device) where it exists (torch 2.3+); before, only CUDA has one (bfloat16 needs none)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(AMP_DEVICE)
    return torch.cuda.amp.GradScaler(enabled=AMP_DEVICE == "cuda")


class TinyRecognizer(nn.Module):
    """A small CNN with BatchNorm and dropout, scored on the first character: fast stand-in for a doctr model."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                                      nn.AdaptiveAvgPool2d((2, 8)), nn.Flatten())
        self.head = nn.Linear(8 * 16, len(VOCAB))

    def forward(self, images, targets):
        labels = torch.tensor([VOCAB.index(t[0]) for t in targets], device=images.device)
        return {"loss": nn.functional.cross_entropy(self.head(self.features(images)), labels)}


def build_model(arch):
    if arch == "tiny":
        return TinyRecognizer()
    from doctr.models import recognition
    return recognition.__dict__[arch](pretrained=False, vocab=VOCAB)


def synthetic_words(steps, batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        images = torch.rand(batch_size, 3, 32, 128, generator=generator)
        lengths = torch.randint(3, 8, (batch_size,), generator=generator).tolist()
        words = ["".join(VOCAB[i] for i in torch.randint(0, len(VOCAB), (n,), generator=generator).tolist())
                 for n in lengths]
        batches.append((images, words))
    return batches


def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = build_model(args.arch)
    forwards = [0]
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    loader = synthetic_words(args.steps, args.batch_size, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * args.steps)
    step_times = []

    def log(train_loss, lr):  # the upstream scripts log every step (wandb / clearml); here: time the step
        now = time.perf_counter()
        step_times.append(now - log.last)
        log.last = now

    train = fit_one_epoch_hand_fixed if args.hand_fixed else fit_one_epoch
    losses = []
    for _ in range(args.epochs):
        log.last = time.perf_counter()
        loss, _ = train(model, loader, lambda x: (x - 0.5) / 0.25, optimizer, scheduler, amp=args.amp, log=log)
        losses.append(loss)
    result = {"forwards_per_step": forwards[0] / (args.epochs * args.steps), "step_times": step_times,
              "losses": losses, "weights": weights_digest(model), "train": train.__name__}
    print(json.dumps({k: v for k, v in result.items() if k != "step_times"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="doctr-style recognition training on synthetic words")
    parser.add_argument("--arch", default="tiny", help="tiny, or a doctr recognition model (vitstr_small, parseq)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--hand-fixed", action="store_true")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
