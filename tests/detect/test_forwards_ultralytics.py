"""eval-with-grad on a real ultralytics model built from its yaml (nothing downloaded, YOLO_OFFLINE=1): the stride
probe in DetectionModel.__init__ (eval(), then one forward with grad on, through `self.forward(x)`, which runs each
layer as `x = m(x)` in `_predict_once`) is one model forward per build, not one per layer, marked one-time and ranked
below per-step costs, at the framework line, naming ultralytics, its version and the user's line that built it."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import shims
from tests.detect.conftest import line_with

os.environ.setdefault("YOLO_OFFLINE", "1")
tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is in the frameworks extra")


def probes_in_eval_mode():
    """Whether this ultralytics runs its stride probe with the model in eval mode (8.0.x ran it in train mode)."""
    import inspect
    return "self.model.eval()" in inspect.getsource(tasks.DetectionModel.__init__)


@pytest.mark.skipif(not probes_in_eval_mode(), reason="this ultralytics runs its stride probe in train mode: no "
                                                      "evaluation forward with grad at construction")
def test_the_stride_probe_is_one_forward_per_build_and_one_time():
    import ultralytics
    evaluated = nn.Linear(3, 3)
    with shims.observe() as report:
        for _ in range(2):
            tasks.DetectionModel("yolov8n.yaml", nc=2, verbose=False)  # the user's build
        optimizer = torch.optim.SGD(evaluated.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            evaluated(torch.randn(2, 3)).sum().backward()
            optimizer.step()
        evaluated.eval()
        for _ in range(4):
            evaluated(torch.randn(2, 3))  # a per-step evaluation mistake
    probe, loop = sorted((f for f in report.findings if f.kind == "eval-with-grad"), key=lambda f: f.per)
    assert (probe.per, loop.per) == ("one-time", "step")
    assert report.findings.index(loop) < report.findings.index(probe)  # one-time costs rank below per-step ones
    assert probe.count == 2  # one model forward per build (22 layers each)
    assert probe.where.replace(os.sep, "/").endswith("ultralytics/nn/tasks.py:" + probe.where.rpartition(":")[2])
    assert "x = m(x)" in open(probe.where.rpartition(":")[0]).readlines()[int(probe.where.rpartition(":")[2]) - 1]
    assert (probe.framework, probe.framework_version) == ("ultralytics", ultralytics.__version__)
    assert probe.user_where == line_with(__file__, "# the user" + "'s build")
    assert "DetectionModel.__init__" in probe.message and probe.seconds_once > 0
    assert loop.count == 4 and loop.where == line_with(__file__, "# a per-step" + " evaluation mistake")
