"""detr patch, as users run it: an LW-DETR-layout script under `python -m shims run` / `doctor`, and the real
rfdetr 1.5.2 `evaluate` (unpatched: the model left in float16 with a graph built; patched: float32 outputs bitwise).
The subjects, fixtures and helpers are test_detr.py's."""

from __future__ import annotations

import json

import pytest
import torch

import shims
from tests.conftest import clean_env, run_python, write
from tests.patches.detr.test_detr import (  # rfdetr_setup, rfdetr_unpatched: fixtures
    CPU_AUTOCAST_FLOAT16_MISSING, REFERENCE, assert_optimizer_unchanged, assert_same_batches, assert_state_unchanged,
    cpu_float16_missing,
    detr_record, enable_detr, float16_autocast_bound, fresh_rfdetr, max_deviation, optimizer_state_copy, ref,
    rfdetr_setup, rfdetr_unpatched, run_rfdetr, state_copy)


LWDETR_ENGINE = """
    import torch
    from torch import nn

    @torch.no_grad()
    def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, args=None):
        model.eval()
        if args.fp16_eval:
            model.half()
        scores = []
        for images in data_loader:
            if args.fp16_eval:
                images = images.half()
            outputs = model(images)
            if args.fp16_eval:
                for key in outputs.keys():
                    outputs[key] = outputs[key].float()
            scores.append(criterion(outputs))
        return scores
"""

LWDETR_MAIN = """
    import argparse, json, sys
    import torch
    from torch import nn
    from engine import evaluate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.LayerNorm(8))
            self.head = nn.Linear(8, 4)
        def forward(self, x):
            return {"pred_boxes": self.head(self.body(x)).sigmoid()}

    torch.manual_seed(0)
    model = Net()
    args = argparse.Namespace(fp16_eval=True)
    data = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    scores = evaluate(model, lambda out: out["pred_boxes"].dtype, None, data, None, "cpu", args)
    print(json.dumps({"params": sorted({str(p.dtype) for p in model.parameters()}), "seen": [str(s) for s in scores],
                      "flag_after": args.fp16_eval}))
"""


@pytest.mark.slow
@pytest.mark.skipif(cpu_float16_missing() is not None, reason=f"the unpatched script: {cpu_float16_missing()}")
def test_lwdetr_layout_script_under_shims_doctor(tmp_path):
    write(tmp_path / "engine.py", LWDETR_ENGINE)
    script = write(tmp_path / "main.py", LWDETR_MAIN)
    doctor = run_python(["-m", "shims", "doctor", script], cwd=tmp_path, timeout=120,
                        env=clean_env(SHIMS_PATCHES="detr"))
    assert json.loads(doctor.stdout.strip().splitlines()[0])["params"] == ["torch.float16"]  # the bug, observed
    with open(script) as f:
        call_line = next(i for i, line in enumerate(f, 1) if "= evaluate(" in line)
    printed = doctor.stdout + doctor.stderr
    assert f"main.py:{call_line}" in printed and "fp16-eval-half" in printed


@pytest.mark.slow
def test_lwdetr_layout_script_under_shims_run(tmp_path):
    """Also where the CPU has no float16 kernel: the patched evaluation needs none."""
    write(tmp_path / "engine.py", LWDETR_ENGINE)
    script = write(tmp_path / "main.py", LWDETR_MAIN)
    report = tmp_path / "receipt.json"
    proc = run_python(["-m", "shims", "run", script], cwd=tmp_path, timeout=120,
                      env=clean_env(SHIMS_PATCHES="detr", SHIMS_REPORT=report))
    fixed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fixed == {"params": ["torch.float32"], "seen": ["torch.float32", "torch.float32"], "flag_after": True}
    record = json.loads(report.read_text())["patches"]["detr"]
    assert record["targets"]["engine:evaluate"]["status"] == "applied"
    assert record["counters"]["evaluations_converted"] == 1


# ---------------------------------------------------------------- real rfdetr 1.5.2



@pytest.mark.slow
def test_rfdetr_unpatched_fp16_eval_leaves_model_half(rfdetr_unpatched):
    model, optimizer, _, _ = rfdetr_unpatched
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert optimizer.param_groups[0]["params"][0].dtype == torch.float16


@pytest.mark.slow
def test_rfdetr_unpatched_fp16_eval_builds_a_graph_and_deviates(rfdetr_setup, rfdetr_unpatched):
    _, _, recorder, failed = rfdetr_unpatched
    if failed:
        pytest.skip(failed)  # test_rfdetr_patched_keeps_model_and_matches_float32 shows the patched path needs none
    assert recorder.graph_built  # rfdetr's evaluate has no no_grad
    assert max_deviation(recorder.batches, rfdetr_setup["float32_outputs"]) > 0


@pytest.mark.slow
def test_rfdetr_patched_keeps_model_and_matches_float32(rfdetr_setup):
    import rfdetr.engine
    import rfdetr.main
    model, optimizer = fresh_rfdetr(rfdetr_setup)
    before, opt_before = state_copy(model), optimizer_state_copy(optimizer)
    enable_detr(modules=())
    targets = detr_record()["targets"]
    assert targets["rfdetr.engine:evaluate"]["status"] == "applied"
    assert targets["rfdetr.main:evaluate"]["status"] == "applied"
    stats, recorder, seen = run_rfdetr(rfdetr_setup, model, evaluate=rfdetr.main.evaluate)  # main's own binding
    assert_state_unchanged(model, before)
    assert_optimizer_unchanged(optimizer, opt_before)
    assert not recorder.graph_built
    assert_same_batches(recorder.batches, rfdetr_setup["float32_outputs"])  # bitwise on CPU
    assert seen == {torch.float32}
    assert len(stats["coco_eval_bbox"]) == 12 and all(-1 <= v <= 1 for v in stats["coco_eval_bbox"])
    record = detr_record()
    assert record["counters"]["evaluations_converted"] == 1 and record["version"] == "1.5.2"
    assert any("rfdetr/engine.py:" in note and "model.half()" in note for note in record["notes"])
    assert any("samples.tensors = samples.tensors.half()" in note for note in record["notes"])
    shims.disable()
    assert rfdetr.engine.evaluate is rfdetr_setup["original"] and rfdetr.main.evaluate is rfdetr_setup["original"]


@pytest.mark.slow
@pytest.mark.skipif(CPU_AUTOCAST_FLOAT16_MISSING is not None, reason=str(CPU_AUTOCAST_FLOAT16_MISSING))
def test_rfdetr_float16_autocast_within_tolerance(rfdetr_setup):
    model, _ = fresh_rfdetr(rfdetr_setup)
    bound = float16_autocast_bound(model, [samples for samples, _ in rfdetr_setup["loader"]],
                                   rfdetr_setup["float32_outputs"])
    before = state_copy(model)
    enable_detr(modules=(), dtype="float16")
    _, recorder, seen = run_rfdetr(rfdetr_setup, model)
    deviation = max_deviation(recorder.batches, rfdetr_setup["float32_outputs"])
    assert_state_unchanged(model, before)
    assert not recorder.graph_built and seen == {torch.float32}
    assert 0 < deviation <= bound, (deviation, bound)  # > 0: the forward really ran in float16 autocast


@pytest.mark.slow
def test_rfdetr_fixed_upstream_from_1_6(rfdetr_setup, monkeypatch):
    """rfdetr >= 1.6 cannot be installed beside 1.5.2: the installed version is faked (shims.versions.installed)."""
    import rfdetr.engine
    from shims import versions
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "1.11.0" if name == "rfdetr" else real(name))
    enable_detr(modules=(REFERENCE,))
    targets = detr_record()["targets"]
    for name in ("rfdetr.engine:evaluate", "rfdetr.main:evaluate"):
        assert targets[name]["status"] == "fixed-upstream" and "1.11.0 >= 1.6" in targets[name]["reason"]
    assert rfdetr.engine.evaluate is rfdetr_setup["original"]
    assert targets[f"{REFERENCE}:evaluate"]["status"] == "applied"  # user LW-DETR code has no rfdetr version
    shims.disable()
    shims.enable(patches=["detr"], strict=True, options={"SHIMS_DETR_MODULES": ""})  # fixed upstream: no raise
    monkeypatch.setattr(versions, "installed", lambda name: "1.5.2" if name == "rfdetr" else real(name))
    shims.disable()
    enable_detr(modules=())
    assert detr_record()["targets"]["rfdetr.engine:evaluate"]["status"] == "applied"
