"""scripts/gpu_check.sh on the CPU: its stages, timeouts, budget and the one results file it writes.

The GPU numbers themselves need the CUDA machine; here the script's --cpu-dry-run runs the same stages on the CPU
at the tiniest sizes, with one stage forced past its time limit, and the results file is read back."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, clean_env

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def results_module():
    spec = importlib.util.spec_from_file_location("gpu_results", os.path.join(REPO, "scripts", "gpu_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(dest, *args, timeout=150, **env):
    environ = clean_env(PYTHON=sys.executable, **env)
    environ.pop("OUT", None)  # the results go to the folder given as argument
    proc = subprocess.run(["bash", SCRIPT, "--cpu-dry-run", *args, str(dest)], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results_module().load(os.path.join(dest, "gpu_check.md")), proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                    reason="the dry run's doctr stage uses amp: examples/doctr_train.py needs torch.amp.GradScaler")
def test_dry_run_runs_each_stage_records_a_timeout_and_writes_one_results_file(tmp_path):
    # limits far above the GPU's: this 2-core machine is shared, and here only the forced timeout may time out
    results, stdout = run_check(tmp_path, "--only", "env,tests_cuda,doctr,detr", timeout=600, GPU_CHECK_BUDGET=580,
                                GPU_CHECK_LIMIT_ENV=150, GPU_CHECK_LIMIT_TESTS_CUDA=150, GPU_CHECK_LIMIT_DOCTR=150,
                                GPU_CHECK_LIMIT_DETR=2)
    assert os.listdir(tmp_path) == ["gpu_check.md"]
    assert results["mode"] == "cpu-dry-run"
    stages = results["stages"]
    assert list(stages) == ["install", "env", "tests_cuda", "doctr", "detr", "tests_cuda_path"]
    assert stages["install"]["status"].startswith("not run")
    assert stages["tests_cuda_path"]["status"] == "not selected (--only)"

    env = results["env"]
    assert env["python"] == sys.version.split()[0] and {"doctr", "detr"} <= set(env["shims_patches"])

    tests = stages["tests_cuda"]["tests"]
    assert stages["tests_cuda"]["status"] == "ok" and tests["failed"] == tests["errors"] == 0
    # every test of tests/detect/test_cuda.py and the test_cuda_* tests of test_accelerator.py and test_profile.py
    files = [os.path.join("tests", "detect", name)
             for name in ("test_cuda.py", "test_accelerator.py", "test_profile.py")]
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                             *files, "-k", "test_cuda"], cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    ids = [line for line in listed.splitlines() if "::" in line]
    assert {i.split("::")[0] for i in ids} == set(files), listed
    assert tests["passed"] + tests["skipped"] == len(ids)

    doctr = stages["doctr"]
    assert doctr["status"] == "ok", doctr.get("log_tail")
    check = doctr["result"]["weights_check"]
    assert check["forwards_per_step"] == {"unpatched": 2.0, "patched": 1.0, "hand-fixed": 1.0}
    assert check["pairs"]["patched vs hand-fixed"]["bitwise"] is True
    # the tiny model has dropout and BatchNorm: the stray forward changes the unpatched run's weights
    assert check["pairs"]["unpatched vs hand-fixed"]["bitwise"] is False
    assert set(doctr["result"]["median_s_per_step"]) == {"unpatched", "patched", "hand-fixed", "forward alone"}

    detr = stages["detr"]  # forced past its 2 s limit: killed, recorded, and the script went on to the writer
    assert detr["status"] == "timeout" and detr["rc"] in (124, 137) and detr["limit_s"] == 2
    assert "result" not in detr

    with open(tmp_path / "gpu_check.md") as f:
        text = f.read()
    assert text.startswith("# shims GPU check") and "**CPU dry run**" in text
    assert "| detr | timeout |" in text and "| patched vs hand-fixed | True | 0 |" in text
    assert "[gpu_check] results:" in stdout


def test_spent_budget_skips_every_stage_and_still_writes_the_file(tmp_path):
    results, _ = run_check(tmp_path, GPU_CHECK_BUDGET=3, timeout=60)
    statuses = {name: stage["status"] for name, stage in results["stages"].items()}
    assert statuses.pop("install").startswith("not run")
    assert set(statuses.values()) == {"skipped: the 3 s budget was spent"}
    assert results["env"] is None


def test_writer_reads_failed_and_missing_stages(tmp_path):
    gpu_results = results_module()
    (tmp_path / "env.rc").write_text("0\n")
    (tmp_path / "env.seconds").write_text("1.5\n")
    (tmp_path / "env.limit").write_text("30\n")
    (tmp_path / "env.json").write_text(json.dumps({"python": "3.12.3", "torch": "2.11.0", "packages": {}}))
    (tmp_path / "doctr.rc").write_text("1\n")
    (tmp_path / "doctr.log").write_text("x" * 5000 + "Traceback: boom\n")
    (tmp_path / "doctr.cmd").write_text("python benchmarks/doctr_step.py --device cuda")
    (tmp_path / "detr.json").write_text("{not json")
    results = gpu_results.collect(str(tmp_path), "cuda")
    assert results["env"]["torch"] == "2.11.0" and results["stages"]["env"]["seconds"] == 1.5
    doctr = results["stages"]["doctr"]
    assert doctr["status"] == "failed" and doctr["log_tail"].endswith("boom\n") and len(doctr["log_tail"]) == 2500
    assert results["stages"]["detr"]["status"] == "not run" and "unreadable JSON" in results["stages"]["detr"][
        "result_error"]
    out = tmp_path / "r.md"
    out.write_text(gpu_results.markdown(results))
    assert gpu_results.load(str(out)) == json.loads(json.dumps(results))
    assert "| doctr | failed |" in out.read_text() and "no result: stage failed" in out.read_text()
