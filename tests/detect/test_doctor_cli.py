"""The observe-only mode end to end, in subprocesses: `python -m shims doctor`, `SHIMS_MODE=detect` + shims.auto.

- A run under detect mode is bitwise identical to a run without shims (final weights, printed losses), while the
  detectors really were active (the same run has findings).
- The table and the JSON report list the findings at the right lines of the script, and the JSON report has exactly
  the keys docs/detect.md documents.
- Processes the script starts (torch.multiprocessing.spawn, DDP with gloo) are observed too; their findings join the
  parent's table.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.conftest import REPO, clean_env, run_python, write
from tests.conftest import free_port
from tests.detect.conftest import DEMO, line_with

DOCS = os.path.join(REPO, "docs", "detect.md")


def load_weights(path):
    import torch
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo script run twice: plainly, and under `python -m shims doctor` (all patches, detect mode)."""
    folder = tmp_path_factory.mktemp("demo")
    plain = run_python([DEMO, "--save", str(folder / "plain.pt")], cwd=folder, timeout=240)
    doctor = run_python(["-m", "shims", "doctor", DEMO, "--save", str(folder / "doctor.pt")], cwd=folder,
                        timeout=240)
    with open(folder / "shims-doctor.json") as f:
        report = json.load(f)
    return folder, plain, doctor, report


def test_doctor_run_is_bitwise_identical_to_a_plain_run(demo_runs):
    folder, plain, doctor, report = demo_runs
    assert report["mode"] == "detect" and report["patches"]["detect"]["findings"]  # the detectors were active
    assert doctor.stdout == plain.stdout  # every printed loss and accuracy
    a, b = load_weights(folder / "plain.pt"), load_weights(folder / "doctor.pt")
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name


def test_doctor_reports_each_mistake_of_the_demo_at_its_line(demo_runs):
    _, _, doctor, report = demo_runs
    stray = line_with(DEMO, 'train_loss = model(images, targets)["loss"]')
    found = {(f["kind"], f["where"]): f for f in report["patches"]["detect"]["findings"]}
    epochs, steps_per_epoch, val_batches = 2, 12, 4
    fp16 = "fp16 accuracy n/a" not in doctor.stdout  # older CPU builds of torch: no float16 kernels, no fp16 eval
    expected = {
        ("unused-forward", stray): epochs * steps_per_epoch,
        ("eval-with-grad", line_with(DEMO, 'logits = model(images)["logits"]')): (epochs + fp16) * val_batches,
        ("half-eval", line_with(DEMO, "        model.half()")): 1,
        ("hook-in-autograd-grad", line_with(DEMO, "param.register_hook(self.queue)")): 2 * epochs * steps_per_epoch,
        ("conv-bias-batchnorm", line_with(DEMO, "nn.Conv2d(1, 8, 3, padding=1)")): 1,  # its one convolution
    }
    if not fp16:  # half-eval is still checked there by tests/detect/test_half.py (float32 compute from float16 weights)
        del expected[("half-eval", line_with(DEMO, "        model.half()"))]
    assert {key: f["count"] for key, f in found.items()} == expected
    # the doctr patch recognises the same stray line statically; the generic finding names the code fix first and
    # that patch as the alternative
    assert [f["where"] for f in report["patches"]["doctr"]["findings"]] == [stray]
    assert found[("unused-forward", stray)]["fix"].startswith("delete the forward at line")
    assert "doctr patch" in found[("unused-forward", stray)]["alternative"]
    # the table on stderr: one row per finding (the doctr patch's own included), with its cost and place, then
    # message, cost and fix (the patch's check names only the patch: an alternative, no code fix)
    table = doctor.stderr[doctor.stderr.index("shims doctor:"):]
    rows = 6 if fp16 else 5
    assert f"shims doctor: {rows} findings;" in table
    for kind, where in found:
        assert re.search(rf"\d+\s+{re.escape(kind)}\s+\d+\s+\S+\s+{re.escape(where)}\n", table), (kind, where)
    assert table.count("\n      cost: ") == rows and table.count("\n      fix:  ") == rows - 1
    assert table.count("\n      or:   ") == 2
    assert "JSON report: " in table


def documented_keys(heading):
    """The `key` names in the first column of the table under `heading` in docs/detect.md."""
    with open(DOCS) as f:
        text = f.read()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", section, re.M)]


def test_report_has_exactly_the_documented_schema(demo_runs):
    from shims import detect
    _, _, _, report = demo_runs
    assert list(report) == documented_keys("### Top-level keys")
    record_keys = documented_keys("### Keys of a record")
    finding_keys = documented_keys("### Keys of a finding")
    assert finding_keys[:6] == ["kind", "message", "where", "count", "cost", "fix"]
    for name, record in report["patches"].items():
        assert list(record) == [k for k in record_keys if k != "observed" or name == "detect"], name
        for finding in record["findings"]:
            # a patch's own check writes the first six; the detectors add the numeric cost (and, for a finding in
            # a framework's code, the framework and the user's line)
            expected = finding_keys[:6] if name != "detect" else \
                [k for k in finding_keys if k not in ("seconds_once", "alternative", "framework", "framework_version",
                                                    "user_where")
                 or k in finding]
            assert list(finding) == expected, name
            assert isinstance(finding["count"], int) and finding["count"] >= 1
            assert re.fullmatch(r".+:\d+", finding["where"]), finding["where"]
    for finding in report["patches"]["detect"]["findings"]:
        assert finding["kind"] in detect.KINDS
    with open(DOCS) as f:
        docs = f.read()
    for kind in detect.KINDS:  # every kind the detectors can write is documented
        assert f"`{kind}`" in docs, kind


def test_detect_mode_through_shims_auto_prints_the_table_and_writes_the_report(tmp_path):
    script = write(tmp_path / "evaluate.py", """
        import shims.auto
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
        outputs = [model(torch.randn(2, 4)) for _ in range(3)]
        print("done")
    """)
    report = tmp_path / "report.json"
    proc = run_python([script], env=clean_env(SHIMS_MODE="detect", SHIMS_REPORT=report), cwd=tmp_path, timeout=120)
    assert proc.stdout == "done\n"
    assert "shims doctor: 1 finding; observed 0 optimizer steps" in proc.stderr and "eval-with-grad" in proc.stderr
    assert f"JSON report: {report}" in proc.stderr
    with open(report) as f:
        findings = json.load(f)["patches"]["detect"]["findings"]
    assert [(f["kind"], f["where"], f["count"]) for f in findings] == [("eval-with-grad", f"{script}:5", 3)]


def test_detect_mode_imports_neither_torch_nor_the_detectors_by_itself():
    proc = run_python(["-c", "import sys, shims.auto; print('torch' in sys.modules, 'shims.detect' in sys.modules)"],
                      env=clean_env(SHIMS_MODE="detect"), timeout=60)
    assert proc.stdout.split() == ["False", "False"]


def test_doctor_keeps_the_script_exit_status_and_output(tmp_path):
    script = write(tmp_path / "fails.py", """
        import sys
        import torch
        print("before")
        sys.exit(3)
    """)
    proc = run_python(["-m", "shims", "doctor", script], cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 3 and proc.stdout == "before\n"
    assert "shims doctor: nothing observed: the script failed (exit status 3) before its first forward" in proc.stderr


@pytest.mark.slow
def test_doctor_observes_spawned_ddp_workers_and_merges_their_findings(tmp_path):
    """DDP on gloo, 2 processes from torch.multiprocessing.spawn: the workers run in detect mode (started by the
    bootstrap), write shims-doctor.<pid>.json, and the parent's table shows their findings with their pid. DDP's
    find_unused_parameters is the ddp patch's own check (not duplicated by the generic detectors)."""
    script = write(tmp_path / "train_ddp.py", """
        import sys
        import torch
        import torch.distributed as dist
        import torch.multiprocessing as mp
        from torch import nn


        def worker(rank, port):
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(12):
                optimizer.zero_grad()
                model(torch.randn(4, 4)).sum().backward()
                optimizer.step()
            net.eval()
            check = net(torch.randn(4, 4))
            dist.destroy_process_group()


        if __name__ == "__main__":
            mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2, join=True)
            print("trained")
    """)
    proc = run_python(["-m", "shims", "doctor", script, str(free_port())], cwd=tmp_path, timeout=240)
    assert proc.stdout.strip().endswith("trained")
    children = sorted(p for p in os.listdir(tmp_path) if re.fullmatch(r"shims-doctor\.\d+\.json", p))
    assert len(children) == 2, os.listdir(tmp_path)
    eval_line = line_with(script, "check = net(torch.randn(4, 4))")
    for name in children:
        with open(tmp_path / name) as f:
            child = json.load(f)
        assert child["mode"] == "detect"
        assert [(f["kind"], f["where"], f["count"]) for f in child["patches"]["detect"]["findings"]] == \
            [("eval-with-grad", eval_line, 1)]
        assert len(child["patches"]["ddp"]["findings"]) == 1  # the ddp patch's check, once per worker
    # one row per site, merged over the two ranks (they agree: no per-rank column); the launcher's JSON holds them
    assert re.search(r"\d+\s+ddp:\S+\s+2\s+\S+\s+.*train_ddp\.py:\d+\n", proc.stderr)
    shown = os.path.relpath(eval_line, tmp_path)  # the table shows places under the working directory relative
    assert re.search(rf"\d+\s+eval-with-grad\s+2\s+\S+\s+{re.escape(shown)}\n", proc.stderr)
    assert "on rank 0, rank 1 (and 1 other process)" in proc.stderr  # the launcher
    with open(tmp_path / "shims-doctor.json") as f:
        merged = json.load(f)["doctor"]["findings"]
    assert sorted((f["kind"].split(":")[0], f["count"], [p for p, _ in f["ranks"]]) for f in merged) == \
        [("ddp", 2, ["rank 0", "rank 1"]), ("eval-with-grad", 2, ["rank 0", "rank 1"])]


@pytest.mark.slow
def test_doctor_waits_for_a_process_the_script_started_and_did_not_wait_for(tmp_path):
    """Lightning's strategy="ddp" starts rank 1 with subprocess.Popen and returns without waiting: the doctor waits
    (bounded) for every process that started observing, and its findings are in the report."""
    worker = write(tmp_path / "worker.py", """
        import sys
        import time
        import torch

        open(sys.argv[1], "w").close()  # joined (Lightning: the process group's rendezvous); the launcher returns
        time.sleep(3)  # slower than the launcher
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
        model.eval()
        late = model(torch.randn(2, 4))
    """)
    launcher = write(tmp_path / "launch.py", f"""
        import os
        import subprocess
        import sys
        import time
        import torch

        subprocess.Popen([sys.executable, {str(worker)!r}, {str(tmp_path / "joined")!r}])
        while not os.path.exists({str(tmp_path / "joined")!r}):
            time.sleep(0.05)
        print("launched")
    """)
    proc = run_python(["-m", "shims", "doctor", launcher], cwd=tmp_path, timeout=240)
    late = line_with(worker, "late = model(torch.randn(2, 4))")
    shown = os.path.relpath(late, tmp_path)
    assert re.search(rf"\d+\s+eval-with-grad\s+1\s+\S+\s+{re.escape(shown)}\n", proc.stderr), proc.stderr[-2000:]
    assert "observed 3 optimizer steps" in proc.stderr and "2 processes" in proc.stderr
    with open(tmp_path / "shims-doctor.json") as f:
        assert [f["kind"] for f in json.load(f)["doctor"]["findings"]] == ["eval-with-grad"]
