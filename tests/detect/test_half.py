"""half-eval (shims/detect/detectors/half.py): .half() / .to(float16) on a module with normalisation layers, then
evaluated; silent on the reference cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.detect.conftest import CPU_AUTOCAST_DTYPE, line_of, make_bn_mlp, observe, sequential


# ---------------------------------------------------------------- 3. half-eval


def test_half_then_evaluation_is_found_at_the_cast():
    model = make_bn_mlp()

    def evaluate_fp16():
        model.eval()
        model.half()  # fp16 eval cast
        with torch.no_grad():
            model(torch.randn(3, 4).half())
    findings = observe(evaluate_fp16)
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == \
        [("half-eval", line_of("fp16 eval cast"), 1)]
    assert "Sequential.half()" in findings[0]["message"] and "training resumed" not in findings[0]["message"]
    assert "1 normalisation layer(s)" in findings[0]["cost"] and "eps 1e-05" in findings[0]["cost"]
    assert "autocast" in findings[0]["fix"]


def test_to_float16_then_evaluation_then_training_is_found():
    """The RF-DETR <= 1.5 shape: cast for evaluation, never cast back, training resumes in float16."""
    model = make_bn_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def evaluate_then_train():
        model.eval()
        model.to(torch.float16)  # to float16 cast
        with torch.no_grad():
            model(torch.randn(3, 4).half())
        model.train()
        model(torch.randn(3, 4).half()).float().sum().backward()  # training resumes
        optimizer.step()
    findings = observe(evaluate_then_train)
    assert [(f["kind"], f["where"]) for f in findings] == [("half-eval", line_of("to float16 cast"))]
    assert "Sequential.to(torch.float16)" in findings[0]["message"]
    assert f"training resumed with it still float16 (forward at {line_of('training resumes')})" in \
        findings[0]["message"]


@pytest.mark.parametrize("case", ["no_norm_layers", "cast_back", "autocast", "train_only"])
def test_half_reference_cases_have_no_findings(case):
    def run():
        if case == "no_norm_layers":
            torch.manual_seed(0)
            model = sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half().eval()
            with torch.no_grad():
                model(torch.randn(3, 4).half())
        elif case == "cast_back":
            model = make_bn_mlp().half()
            model.float().eval()
            with torch.no_grad():
                model(torch.randn(3, 4))
        elif case == "autocast":
            model = make_bn_mlp().eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=CPU_AUTOCAST_DTYPE):
                model(torch.randn(3, 4))
        else:  # deliberate float16 training, never evaluated: not this detector's business
            model = make_bn_mlp().half().train()
            model(torch.randn(3, 4).half()).float().sum().backward()
    assert observe(run) == []
