"""data-copied-every-epoch (shims/detect/detectors/device_copies.py): the CPU plays a device with 1 GiB free."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shims

from shims.detect import devices
from tests.detect.conftest import line_of, observe_with_the_clock, of_kind


# ---------------------------------------------------------------- data-copied-every-epoch



def full_batch_training(epochs=3, change=False):
    """PINN-style full-batch training: the whole data set is one host tensor, copied to the device every epoch."""
    torch.manual_seed(0)
    device = torch.device("cpu")  # the accelerator, in the stand-in
    x_host, y_host = torch.randn(64, 8), torch.randn(64, 1)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        if change:
            x_host.add_(0.01)  # the data changes between epochs (an in-place augmentation)
            y_host.mul_(0.99)
        x, y = x_host.to(device), y_host.to(device)  # full-batch copy
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def test_the_same_host_tensors_copied_every_epoch_are_found(free_gib):
    findings = observe_with_the_clock(full_batch_training, epochs=3)
    assert of_kind(findings, "data-copied-every-epoch") == [(line_of("full-batch copy"), 3)]
    finding = findings[0]
    assert "the same host tensors" in finding["message"] and "2.2 KiB per round" in finding["message"]
    assert "1.0 GiB free" in finding["message"]
    assert "(measured host time" in finding["cost"] and "estimated" in finding["cost"] and "GB/s" in finding["cost"]
    assert "once" in finding["fix"]


def test_a_sparse_copy_does_not_switch_the_detector_off(free_gib):
    """Sparse tensors have no data_ptr: their copies are left out, and the detector keeps working."""
    def run():
        torch.eye(3).to_sparse().to("cpu")
        full_batch_training(epochs=3)
    assert of_kind(observe_with_the_clock(run), "data-copied-every-epoch") == [(line_of("full-batch copy"), 3)]
    assert not shims.status()["patches"]["detect"]["notes"] or \
        not any("device-copies" in note for note in shims.status()["patches"]["detect"]["notes"])


def sliced_epochs(epochs=3, batch=16):
    torch.manual_seed(0)
    x_all = torch.randn(64, 8)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for start in range(0, 64, batch):
            x = x_all[start:start + batch].to("cpu")  # slices of one host tensor
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()


def test_slices_of_one_host_tensor_copied_every_epoch_are_found(free_gib):
    findings = observe_with_the_clock(sliced_epochs, epochs=3)
    assert of_kind(findings, "data-copied-every-epoch") == [(line_of("slices of one host tensor"), 3)]
    assert "2.0 KiB per round" in findings[0]["message"]


def tensor_dataset_epochs(epochs=3, rebuild_loader=False):
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        if rebuild_loader:
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        for x, y in loader:  # iterate the TensorDataset
            x, y = x.to("cpu"), y.to("cpu")  # batch copies
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()


@pytest.mark.parametrize("rebuild_loader", [False, True])
def test_a_tensor_dataset_loader_copied_every_epoch_is_found(free_gib, rebuild_loader):
    findings = [f for f in observe_with_the_clock(tensor_dataset_epochs, epochs=3, rebuild_loader=rebuild_loader)
                if f["kind"] == "data-copied-every-epoch"]  # (its DataLoader without workers is found too)
    assert [(f["where"], f["count"]) for f in findings] == [(line_of("batch copies"), 3)]
    message = findings[0]["message"]
    assert f"TensorDataset of host tensors iterated at {line_of('iterate the TensorDataset')}" in message
    assert "1.1 KiB per round" in message and "all of it (1.1 KiB)" in message
    assert "TensorDataset(x.to(device), y.to(device))" in findings[0]["fix"]


def fresh_batches(steps=6):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(16, 8).to("cpu")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def data_on_the_device_once(epochs=3):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8).to("cpu"), torch.randn(64, 1).to("cpu")
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("case", ["fresh batches", "changed in place", "moved once", "a plain DataLoader"])
def test_copies_of_new_data_are_silent(free_gib, case):
    if case == "fresh batches":
        run = fresh_batches
    elif case == "changed in place":
        run = lambda: full_batch_training(epochs=3, change=True)  # noqa: E731
    elif case == "moved once":
        run = data_on_the_device_once
    else:  # a Dataset whose items are made anew at each epoch: nothing to keep on the device
        class Fresh(torch.utils.data.Dataset):
            def __len__(self):
                return 16

            def __getitem__(self, index):
                return torch.randn(8), torch.randn(1)

        def run():
            for _ in range(3):
                for x, y in torch.utils.data.DataLoader(Fresh(), batch_size=4):
                    x.to("cpu"), y.to("cpu")
    assert of_kind(observe_with_the_clock(run), "data-copied-every-epoch") == []


@pytest.mark.usefixtures("tensors_count_as_on_an_accelerator")
def test_data_that_would_not_fit_is_silent(monkeypatch):
    monkeypatch.setattr(devices, "free_memory", lambda torch, device: 4096)  # 2.2 KiB is over half of it
    assert of_kind(observe_with_the_clock(full_batch_training, epochs=3), "data-copied-every-epoch") == []


def test_copies_on_the_cpu_are_silent():
    assert observe_with_the_clock(full_batch_training, epochs=3) == []
    assert observe_with_the_clock(tensor_dataset_epochs, epochs=3) == []
