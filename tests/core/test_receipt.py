"""The receipt: shims.status()'s documented shape, the JSON report at exit."""

from __future__ import annotations

import importlib
import json
import os


import shims
from tests.conftest import clean_env, run_python
from tests.core.conftest import TIMEOUT, REAL_PATCHES, fake_patch, enable

# ---------------------------------------------------------------- 6. the receipt

def test_status_has_the_documented_shape(target):
    enable(fake_patch(target), fake_patch(target, name="off", targets=("evaluate",)), SHIMS_DISABLE="off")
    importlib.import_module(target).train(1)
    receipt = shims.status()
    assert receipt["schema"] == 1 and receipt["mode"] == "fix" and receipt["strict"] is False
    assert receipt["pid"] == os.getpid()
    fake = receipt["patches"]["fake"]
    assert {"status", "reason", "targets", "counters"} <= set(fake)
    assert fake["status"] == "applied" and isinstance(fake["reason"], str)
    assert fake["targets"] == {f"{target}:train": {"status": "applied", "reason": ""}}
    assert fake["counters"] == {"calls": 1}
    off = receipt["patches"]["off"]
    assert off["status"] == "disabled" and "SHIMS_DISABLE" in off["reason"]
    json.dumps(receipt)  # JSON-serialisable as it is


def test_report_is_written_at_exit_and_names_why_a_patch_is_off(tmp_path):
    report = tmp_path / "out" / "receipt.json"
    proc = run_python(["-c", "import shims.auto; print('ran')"],
                      env=clean_env(SHIMS_REPORT=report, SHIMS_DISABLE="ddp"), timeout=TIMEOUT)
    assert proc.stdout.strip() == "ran"
    with open(report) as f:
        receipt = json.load(f)
    assert receipt["schema"] == 1 and receipt["mode"] == "fix" and receipt["pid"] > 0
    assert set(receipt["patches"]) == set(REAL_PATCHES)
    ddp = receipt["patches"]["ddp"]
    assert ddp["status"] == "disabled" and "SHIMS_DISABLE" in ddp["reason"]
    assert receipt["patches"]["doctr"]["status"] == "not-imported"
    assert all({"status", "reason", "targets", "counters"} <= set(r) for r in receipt["patches"].values())
