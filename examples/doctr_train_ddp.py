"""The DDP variant, laid out like doctr's references/recognition/train_pytorch_ddp.py (<= v0.11.0): `fit_one_epoch`
takes a device and has no log callback, `main(rank, world_size, args)` runs in processes started by `mp.spawn`, which
import this file as `__mp_main__`. With the stray forward of doctr issue #1861. CPU and gloo here:

    python -m shims run examples/doctr_train_ddp.py --backend gloo --out-dir OUT
"""

import argparse
import json
import os
import socket

os.environ.setdefault("USE_TORCH", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from doctr_train import TinyRecognizer, build_model, grad_scaler, synthetic_words, weights_digest  # noqa: E402

AMP_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fit_one_epoch(model, device, train_loader, batch_transforms, optimizer, scheduler, amp=False):
    if amp:
        scaler = grad_scaler()

    model.train()
    epoch_loss, steps = 0.0, 0
    progress = tqdm(train_loader, dynamic_ncols=True, disable=True)
    for images, targets in progress:
        images = images.to(device)
        images = batch_transforms(images)

        train_loss = model(images, targets)["loss"]

        optimizer.zero_grad()
        if amp:
            with torch.autocast(AMP_DEVICE, dtype=torch.bfloat16):
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

        epoch_loss += train_loss.item()
        steps += 1

    epoch_loss /= steps
    return epoch_loss, last_lr


def main(rank, world_size, args):
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    model = build_model(args.arch)
    forwards = [0]
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    model = DDP(model)
    loader = synthetic_words(args.steps, args.batch_size, args.seed + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.steps)
    loss, _ = fit_one_epoch(model, device, loader, lambda x: (x - 0.5) / 0.25, optimizer, scheduler, amp=args.amp)
    result = {"rank": rank, "pid": os.getpid(), "forwards_per_step": forwards[0] / args.steps, "loss": loss,
              "weights": weights_digest(model.module), "name": __name__}
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="doctr-style DDP recognition training on synthetic words")
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="nccl", help="nccl (upstream default) or gloo (CPU)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    mp.spawn(main, args=(args.world_size, args), nprocs=args.world_size, join=True)
