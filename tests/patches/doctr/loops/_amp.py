"""Autocast and GradScaler for the reference loops: CUDA as upstream when present, else the CPU equivalents."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def autocast():
    return torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.bfloat16)


def grad_scaler():
    if hasattr(torch.amp, "GradScaler"):  # torch 2.3+: one GradScaler for every device
        return torch.amp.GradScaler(DEVICE)
    return torch.cuda.amp.GradScaler(enabled=DEVICE == "cuda")  # before 2.3 only CUDA's; CPU bfloat16 needs none
