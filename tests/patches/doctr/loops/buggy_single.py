"""doctr-style fit_one_epoch with the dead forward (as in references/recognition/train_pytorch.py up to v0.11.0)."""

import torch
from tqdm.auto import tqdm

from tests.patches.doctr.loops._amp import autocast, grad_scaler


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
        log(train_loss=train_loss.item(), lr=last_lr)

        epoch_loss += train_loss.item()
        steps += 1

    epoch_loss /= steps
    return epoch_loss, last_lr
