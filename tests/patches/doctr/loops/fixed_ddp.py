"""DDP variant as upstream fixed it (PR #1862)."""

import torch
from tqdm.auto import tqdm

from tests.patches.doctr.loops._amp import autocast, grad_scaler


def fit_one_epoch(model, device, train_loader, batch_transforms, optimizer, scheduler, amp=False):
    if amp:
        scaler = grad_scaler()

    model.train()
    epoch_loss, steps = 0.0, 0
    progress = tqdm(train_loader, dynamic_ncols=True, disable=True)
    for images, targets in progress:
        images = images.to(device)
        images = batch_transforms(images)

        optimizer.zero_grad()
        if amp:
            with autocast():
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
