"""Autocast and GradScaler for the reference loops: CUDA as upstream when present, else the CPU equivalents."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def autocast():
    return torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.bfloat16)


def grad_scaler():
    return torch.amp.GradScaler(DEVICE)
