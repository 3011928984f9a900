"""Detectors of the detect catalogue: create-graph-unused, zero-grad-filled, conv-bias-batchnorm.

Each fires on a small loop with the mistake, at its line, with its count, and stays silent on the correct version.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shims
from tests.detect.conftest import line_of, observe

SELF = __file__


def summary(findings):
    return [(f["kind"], f["where"], f["count"]) for f in findings]


# ---------------------------------------------------------------- create-graph-unused


class Field(nn.Module):
    """A PINN-style field u(x): a small MLP with tanh (its derivatives are not constant)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def pinn_steps(residual_in_loss, steps=3):
    """Fits u to data; u_x, u_xx from autograd.grad. With residual_in_loss the PDE residual u_xx + u is part of the
    loss (create_graph is needed); without it the residual is only monitored (the speed article's mistake)."""
    torch.manual_seed(0)
    model = Field()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitored = []
    for _ in range(steps):
        x = torch.linspace(0, 1, 32).unsqueeze(1).requires_grad_(True)
        u = model(x)
        u_x = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        u_xx = torch.autograd.grad(u_x.sum(), x, create_graph=True)[0]  # second derivative
        residual = u_xx + u
        loss = F.mse_loss(u, torch.sin(x))
        if residual_in_loss:
            loss = loss + residual.pow(2).mean()
        else:
            monitored.append(residual.detach().abs().mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, monitored


def test_create_graph_whose_derivatives_no_backward_uses_is_found():
    findings = observe(pinn_steps, residual_in_loss=False, steps=3)
    # u_x's graph is used (u_xx is taken through it); u_xx's is never backpropagated: one finding per step
    assert summary(findings) == [("create-graph-unused", line_of("second derivative"), 3)]
    assert "measured on the first call" in findings[0]["cost"] and "median, measured" in findings[0]["cost"]
    assert "drop create_graph=True" in findings[0]["fix"]


def test_create_graph_used_by_a_later_backward_has_no_findings():
    assert observe(pinn_steps, residual_in_loss=True, steps=3) == []


@pytest.mark.parametrize("residual_in_loss", [False, True])
def test_create_graph_observed_changes_nothing(residual_in_loss):
    plain, plain_monitored = pinn_steps(residual_in_loss)
    shims.enable(patches="none", mode="detect")
    try:
        observed, observed_monitored = pinn_steps(residual_in_loss)
    finally:
        shims.disable()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), observed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(plain_monitored, observed_monitored))


def test_gradient_penalty_has_no_findings():
    """WGAN-GP: the gradient norm is part of the critic's loss, so create_graph=True is needed."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.01)

    def train():
        for _ in range(3):
            x = torch.randn(8, 4, requires_grad=True)
            score = critic(x)
            grad = torch.autograd.grad(score.sum(), x, create_graph=True)[0]
            loss = score.mean() + 10 * (grad.norm(dim=1) - 1).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert observe(train) == []


def test_derivatives_kept_alive_to_the_end_are_judged_at_the_end():
    torch.manual_seed(0)
    model = Field()
    kept = []

    def run():
        for _ in range(2):
            x = torch.rand(8, 1, requires_grad=True)
            kept.append(torch.autograd.grad(model(x).sum(), x, create_graph=True)[0])  # kept derivative
    assert summary(observe(run)) == [("create-graph-unused", line_of("kept derivative"), 2)]
    assert all(t.grad_fn is not None for t in kept)  # the graphs really were alive


# ---------------------------------------------------------------- zero-grad-filled


def train_zero_filled(set_to_none, steps=4, module_zero_grad=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        if module_zero_grad:
            model.zero_grad(set_to_none=set_to_none)  # module zero_grad
        elif set_to_none is None:
            optimizer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=set_to_none)  # optimizer zero_grad
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
    return model


GRAD_BYTES = (8 * 16 + 16 + 16 * 1 + 1) * 4  # every parameter's float32 gradient


def test_zero_grad_set_to_none_false_is_found_with_the_bytes_filled():
    findings = observe(train_zero_filled, False, steps=4)
    # the first call had no gradient to fill yet
    assert summary(findings) == [("zero-grad-filled", line_of("optimizer zero_grad"), 3)]
    assert f"{GRAD_BYTES} bytes of gradients written with zeros per call (measured)" in findings[0]["cost"]
    assert "optimizer.zero_grad()" in findings[0]["fix"]


def test_module_zero_grad_set_to_none_false_is_found():
    findings = observe(train_zero_filled, False, steps=3, module_zero_grad=True)
    assert summary(findings) == [("zero-grad-filled", line_of("module zero_grad"), 2)]
    assert findings[0]["message"].startswith("module.zero_grad(set_to_none=False)")


@pytest.mark.parametrize("set_to_none", [None, True])
def test_zero_grad_releasing_gradients_has_no_findings(set_to_none):
    assert observe(train_zero_filled, set_to_none, steps=4) == []
    assert observe(train_zero_filled, True, steps=3, module_zero_grad=True) == []


def test_zero_grad_observed_changes_nothing():
    plain = train_zero_filled(False, steps=4)
    shims.enable(patches="none", mode="detect")
    try:
        observed = train_zero_filled(False, steps=4)
    finally:
        shims.disable()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), observed.parameters()))
    assert all(p.grad is not None for p in observed.parameters())  # zero-filled, as asked, not released


# ---------------------------------------------------------------- conv-bias-batchnorm


class Block(nn.Module):
    def __init__(self, dims, bias, between):
        super().__init__()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                      3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv = conv(2, 4, 3, padding=1, bias=bias)  # conv definition
        self.norm = norm(4)
        self.between = between

    def forward(self, x):
        y = self.conv(x)
        if self.between == "relu":
            y = F.relu(y)
        elif self.between == "relu_":
            y = F.relu(y, inplace=True)
        return self.norm(y)


def train_block(dims=2, bias=True, between=None, steps=3, eval_mode=False):
    torch.manual_seed(0)
    model = Block(dims, bias, between)
    model.train(not eval_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn((2, 2) + (5,) * dims)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bias_feeding_batchnorm_is_found_at_the_conv_definition(dims):
    findings = observe(train_block, dims)
    assert summary(findings) == [("conv-bias-batchnorm", line_of("conv definition"), 1)]
    assert f"Conv{dims}d -> BatchNorm{dims}d" in findings[0]["message"]
    assert findings[0]["cost"].startswith("4 bias parameters")
    assert f"{2 * 4 * 5 ** dims} additions per forward" in findings[0]["cost"]
    assert "bias=False" in findings[0]["fix"]


def test_conv_bias_is_found_where_the_forward_runs_it_when_built_before_detect_mode():
    """A model built before detect mode started (no construction site known): the place of the BatchNorm call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))

    def run():
        for _ in range(2):
            model(torch.randn(2, 1, 6, 6)).sum().backward()  # sequential forward
    assert summary(observe(run)) == [("conv-bias-batchnorm", line_of("sequential forward"), 1)]


@pytest.mark.parametrize("case", ["no_bias", "relu", "inplace_relu", "eval_batchnorm"])
def test_conv_bias_correct_versions_have_no_findings(case):
    if case == "no_bias":
        run = lambda: train_block(2, bias=False)  # noqa: E731
    elif case == "relu":
        run = lambda: train_block(2, between="relu")  # noqa: E731
    elif case == "inplace_relu":  # the very tensor object reaches BatchNorm, but changed in place
        run = lambda: train_block(2, between="relu_")  # noqa: E731
    else:  # BatchNorm with frozen running statistics: the bias is not cancelled
        run = lambda: train_block(2, eval_mode=True)  # noqa: E731
    assert observe(run) == []


def test_conv_bias_observed_changes_nothing():
    plain = train_block(2)
    shims.enable(patches="none", mode="detect")
    try:
        observed = train_block(2)
    finally:
        shims.disable()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), observed.state_dict().values()))


# ---------------------------------------------------------------- installation


def test_the_catalogue_wraps_once_and_reverts_completely():
    """torch.autograd.grad is wrapped once for every detector that watches it (param hooks, create_graph); every
    wrapped attribute is the original again after shims.disable()."""
    from torch.nn.modules import conv
    watched = [(torch.autograd, "grad"), (torch.optim.Optimizer, "zero_grad"), (nn.Module, "zero_grad"),
               (conv._ConvNd, "__init__")]
    before = {key: key[0].__dict__.get(key[1]) for key in watched}
    shims.enable(patches="none", mode="detect")
    try:
        assert all(key[0].__dict__.get(key[1]) is not before[key] for key in watched)
        assert torch.autograd.grad.__wrapped__ is before[(torch.autograd, "grad")]  # one wrapper, not two
    finally:
        shims.disable()
    assert all(key[0].__dict__.get(key[1]) is before[key] for key in watched)


def test_create_graph_detector_is_refused_without_node_prehooks(monkeypatch):
    """Without grad_fn.register_prehook no one can tell whether a backward reached the derivatives: create-graph is
    refused with the reason (never a silent "no findings"); zero-grad-filled, which needs nothing, still reports."""
    monkeypatch.delattr(torch.autograd.graph.Node, "register_prehook")

    def run():
        pinn_steps(residual_in_loss=False, steps=2)
        train_zero_filled(False, steps=2)
    findings = observe(run)
    assert [f["kind"] for f in findings] == ["zero-grad-filled"]
    target = shims.status()["patches"]["detect"]["targets"]["torch:detectors.create-graph"]
    assert target["status"] == "skipped"
    assert "refused (create-graph-unused)" in target["reason"] and "register_prehook" in target["reason"]
