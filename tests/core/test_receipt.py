"""The receipt: shims.status()'s documented shape, the JSON report at exit."""
from __future__ import annotations

import importlib
import json
import os
import re
import typing

import pytest

import shims
from shims import receipt as receipt_module
from tests.conftest import clean_env, run_python
from tests.conftest import write
from tests.core.conftest import REAL_PATCHES, TIMEOUT, enable, fake_patch


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


def test_the_public_api_is_typed_and_the_receipt_is_its_typeddicts(target):
    hints = {name: typing.get_type_hints(getattr(shims, name)) for name in ("enable", "disable", "status")}
    assert hints["status"]["return"] is receipt_module.ReceiptData is hints["enable"]["return"]
    assert hints["disable"]["return"] is type(None)
    assert {"patches", "disable", "mode", "strict", "report", "log", "options"} <= set(hints["enable"])
    enable(fake_patch(target))
    importlib.import_module(target).train(1)
    receipt = shims.status()
    assert set(receipt) == set(typing.get_type_hints(receipt_module.ReceiptData))
    patch_keys = set(typing.get_type_hints(receipt_module.PatchData))
    assert all(set(record) == patch_keys for record in receipt["patches"].values())
    target_keys = set(typing.get_type_hints(receipt_module.TargetData))
    assert all(set(t) == target_keys for r in receipt["patches"].values() for t in r["targets"].values())


def test_docs_in_the_receipt_are_urls_of_the_projects_docs(tmp_path):
    report = tmp_path / "receipt.json"
    run_python(["-c", "import shims.auto"], env=clean_env(SHIMS_REPORT=report), timeout=TIMEOUT)
    docs = {name: r["docs"] for name, r in json.loads(report.read_text())["patches"].items()}
    assert set(docs) == set(REAL_PATCHES)
    assert all(url == f"{receipt_module.DOCS_URL}docs/patches/{name}.md" for name, url in docs.items()), docs


LOGGING_SCRIPT = """
import logging, sys
import multiprocessing as mp
if sys.argv[1] == "timm":
    from timm.utils import setup_default_logging
    setup_default_logging()  # timm's training scripts: the root logger at INFO, with a handler
else:
    logging.basicConfig(level=logging.INFO)

def work(q):
    import torch.nn.parallel  # a child that reaches a target (the ddp patch applies)
    q.put(1)

if __name__ == "__main__":
    import torch.nn.parallel
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    workers = [ctx.Process(target=work, args=(q,)) for _ in range(2)]
    [w.start() for w in workers]
    [q.get(timeout=60) for _ in workers]
    [w.join(60) for w in workers]
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["basicConfig", "timm"])
def test_one_receipt_line_per_process_through_the_shims_logger_only(tmp_path, how):
    if how == "timm":
        pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    script = write(tmp_path / "train.py", LOGGING_SCRIPT)
    quiet = run_python(["-m", "shims", "run", script, how], env=clean_env(), timeout=240)
    assert "receipt" not in quiet.stderr, quiet.stderr  # the application's root logger at INFO gets nothing
    loud = run_python(["-m", "shims", "run", script, how], env=clean_env(SHIMS_LOG="INFO", RANK="0"), timeout=240)
    lines = [line for line in loud.stderr.splitlines() if "receipt" in line]
    pids = [int(re.search(r"receipt \(pid (\d+), rank 0\)", line).group(1)) for line in lines]
    assert len(lines) == len(set(pids)) == 3, loud.stderr  # the script and its two workers, once each
    assert all(line.startswith("[shims INFO] receipt (pid ") and "ddp: applied" in line for line in lines), lines
