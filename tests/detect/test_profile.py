"""`python -m shims doctor --profile N` / SHIMS_PROFILE_STEPS=N: torch.profiler over N optimizer steps.

- Through the CLI, on a tiny CPU training script: the top operators table is printed with operator names, the
  Chrome/Perfetto trace is written next to the JSON report (valid JSON, traceEvents, exactly the N profiled steps),
  and the run is bitwise identical to a plain run (every printed loss, the final weights).
- A run that ends before the N steps is stopped at exit and says how many were recorded; one that ends within the
  warm-up says nothing was; a script's own running profiler is left alone.
- Off by default: no step listener, no profiler, no trace file.
- The window says what fell inside it besides training steps (an evaluation, a torch.save), and the operators are
  averaged per optimizer step.
- Bad values are rejected, naming the option (or variable), the value and what is valid.
"""

from __future__ import annotations

import json
import os
import re
import types

import pytest
import torch
from torch import nn

import shims
from shims import config
from shims.errors import ShimsConfigError
from tests.conftest import clean_env, run_python, write

TRAIN = """
    import sys
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(int(sys.argv[1])):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item()!r}")
    torch.save(model.state_dict(), sys.argv[2])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny script run plainly and under `python -m shims doctor --profile 2` (6 steps: 2 warm-up, 2 profiled)."""
    folder = tmp_path_factory.mktemp("profile")
    script = write(folder / "train.py", TRAIN)
    plain = run_python([script, "6", str(folder / "plain.pt")], cwd=folder, timeout=240)
    doctor = run_python(["-m", "shims", "doctor", "--profile", "2", script, "6", str(folder / "doctor.pt")],
                        cwd=folder, timeout=240)
    return folder, plain, doctor


def test_profile_prints_the_top_operators_table(runs):
    folder, _, doctor = runs
    err = doctor.stderr
    header = "shims doctor --profile 2: torch.profiler, optimizer steps 3-4 (2 of 2 profiled), after 2 warm-up " \
             "steps; top 15 operators by self CPU time"
    assert header in err, err[-3000:]
    table = err[err.index(header):]
    assert "Name" in table and "Self CPU" in table
    for name in ("aten::addmm", "Optimizer.step#SGD.step"):  # the model's own operators and the step
        assert name in table, name
    rows = table.split("\n")[4:]
    rows = rows[:next(i for i, row in enumerate(rows) if row.startswith("---"))]
    assert 5 <= len(rows) <= 15  # top 15 at most
    trace = folder / "shims-doctor.trace.json"
    assert f"trace (chrome://tracing or https://ui.perfetto.dev): {trace}\n" in table
    assert table.index(str(trace)) < table.index("shims doctor: ")  # before the findings table


def test_profile_writes_the_trace_next_to_the_json_report(runs):
    folder, _, _ = runs
    with open(folder / "shims-doctor.trace.json") as f:
        trace = json.load(f)
    names = [event.get("name", "") for event in trace["traceEvents"]]
    assert "aten::addmm" in names
    # the window is exactly the two profiled steps: one ProfilerStep range and one optimizer step each
    assert len([n for n in names if n.startswith("ProfilerStep#")]) == 2
    assert names.count("Optimizer.step#SGD.step") == 2
    with open(folder / "shims-doctor.json") as f:
        report = json.load(f)
    state = report["patches"]["detect"]["targets"]["torch:detectors.profile"]
    assert state["status"] == "applied" and str(folder / "shims-doctor.trace.json") in state["reason"]
    assert [name for name in os.listdir(folder) if name.endswith(".trace.json")] == ["shims-doctor.trace.json"]


def test_profiled_run_is_bitwise_identical_to_a_plain_run(runs):
    folder, plain, doctor = runs
    assert doctor.stdout == plain.stdout  # every loss, printed with repr
    a = torch.load(folder / "plain.pt", weights_only=True)
    b = torch.load(folder / "doctor.pt", weights_only=True)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name


SPAWN = """
    import os
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn

    def worker(rank, world):
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = nn.parallel.DistributedDataParallel(nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2,), nprocs=2)
"""


def test_workers_profile_their_own_steps_beside_the_report(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = write(tmp_path / "spawn.py", SPAWN)
    proc = run_python(["-m", "shims", "doctor", "--profile", "1", script], cwd=tmp_path, timeout=240,
                      env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    traces = sorted(p for p in os.listdir(tmp_path) if p.endswith(".trace.json"))
    assert len(traces) == 2 and all(re.fullmatch(r"shims-doctor\.\d+\.trace\.json", p) for p in traces), traces
    for name in traces:
        pid = name.split(".")[1]
        assert f"(pid {pid}) shims doctor --profile 1: torch.profiler, optimizer step 3 (1 of 1 profiled)" \
            in proc.stderr
        with open(tmp_path / name) as f:
            assert json.load(f)["traceEvents"]
    with open(tmp_path / "shims-doctor.json") as f:
        state = json.load(f)["patches"]["detect"]["targets"]["torch:detectors.profile"]
    assert state["status"] == "applied" and "no optimizer step in this process" in state["reason"]
    assert all(str(tmp_path / name) in state["reason"] for name in traces)
    assert "not profiled" not in proc.stderr


# ---------------------------------------------------------------- in process: how a run ends, off, another profiler

def train(steps, during=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        if during is not None:
            during(step + 1)


def profiled(tmp_path, steps, run):
    shims.enable(patches="none", mode="detect", report=str(tmp_path / "r.json"),
                 options={"SHIMS_PROFILE_STEPS": str(steps)})
    try:
        run()
    finally:
        shims.disable()
    return shims.status()["patches"]["detect"]["targets"].get("torch:detectors.profile")


def profiler_on():
    return torch._C._autograd._profiler_enabled()


def test_run_that_ends_first_is_stopped_at_exit_and_says_how_many_steps(tmp_path, capfd):
    seen = []
    state = profiled(tmp_path, 5, lambda: train(3, during=lambda step: seen.append((step, profiler_on()))))
    # after step 1 the profiler's warm-up phase (set up, not recording); recording from the end of step 2 on
    assert seen == [(1, False), (2, True), (3, True)]
    assert not profiler_on()
    err = capfd.readouterr().err
    assert "optimizer step 3 (1 of 5 profiled; the run ended first: the recording runs on from the last step to " \
           "exit)" in err
    assert state["status"] == "applied"
    with open(tmp_path / "r.trace.json") as f:
        assert json.load(f)["traceEvents"]


def test_profile_stops_after_n_steps(tmp_path, capfd):
    seen = []
    profiled(tmp_path, 1, lambda: train(5, during=lambda step: seen.append(profiler_on())))
    assert seen == [False, True, False, False, False]  # recording from the end of step 2 to the end of step 3
    assert "optimizer step 3 (1 of 1 profiled)" in capfd.readouterr().err


def test_run_within_the_warm_up_profiles_nothing_and_says_so(tmp_path, capfd):
    state = profiled(tmp_path, 3, lambda: train(1))
    assert state["status"] == "skipped"
    assert "ended after 1 optimizer step(s), within the 2 warm-up steps: nothing recorded" in state["reason"]
    assert "not profiled" in capfd.readouterr().err
    assert not (tmp_path / "r.trace.json").exists()


def test_a_running_profiler_of_the_script_is_left_alone(tmp_path):
    def own_profiler():
        with torch.profiler.profile() as prof:
            train(4)
        assert any(e.key == "aten::addmm" for e in prof.key_averages())  # the script's profile is whole
    state = profiled(tmp_path, 2, own_profiler)
    assert state["status"] == "skipped" and "already running" in state["reason"]
    assert not (tmp_path / "r.trace.json").exists()


def test_a_profiler_the_script_starts_while_recording_wins(tmp_path):
    kept = []

    def own_profiler(step):
        if step == 2:  # the shims profiler is recording now
            with torch.profiler.profile() as prof:
                torch.ones(3).sum()
            kept.append(any(e.key == "aten::sum" for e in prof.key_averages()))
    state = profiled(tmp_path, 3, lambda: train(6, during=own_profiler))
    assert kept == [True]  # the script's profiler works; torch cancels ours (2.14+) or ours fails to stop (2.0)
    assert state["status"] in ("skipped", "error")
    assert not profiler_on()


def test_off_by_default_subscribes_to_nothing(tmp_path, monkeypatch):
    from shims import detect
    monkeypatch.chdir(tmp_path)
    seen = []
    shims.enable(patches="none", mode="detect")
    try:
        listeners = [detector.name for detector, _ in detect._CURRENT._steps]
        observing = shims.status()["patches"]["detect"]["targets"]["torch:detectors"]["reason"]
        train(4, during=lambda step: seen.append(profiler_on()))
    finally:
        shims.disable()
    assert "profile" not in listeners and listeners  # the other detectors do listen to steps
    assert seen == [False] * 4
    assert "torch:detectors.profile" not in shims.status()["patches"]["detect"]["targets"]
    assert observing.startswith("observing ") and "profiler" not in observing and ", ," not in observing
    assert not list(tmp_path.iterdir())


def test_sort_key_is_device_time_by_the_name_this_torch_uses():
    from shims.detect.profiling import _sort_key
    new = types.SimpleNamespace(self_device_time_total=5, self_cpu_time_total=1)
    old = types.SimpleNamespace(self_cuda_time_total=5, self_cpu_time_total=1)  # torch before the rename
    assert _sort_key([new], "cuda") == ("self_device_time_total", "self CUDA time")
    assert _sort_key([old], "cuda") == ("self_cuda_time_total", "self CUDA time")
    assert _sort_key([new], None) == ("self_cpu_time_total", "self CPU time")
    idle = types.SimpleNamespace(self_device_time_total=0, self_cpu_time_total=1)  # device traced, no kernel seen
    assert _sort_key([idle], "cuda") == ("self_cpu_time_total", "self CPU time")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sorting by device time)")
def test_cuda_profile_is_sorted_by_device_time(tmp_path, capfd):
    def train_cuda():
        model = nn.Linear(256, 256).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(64, 256, device="cuda")).sum().backward()
            optimizer.step()
        torch.cuda.synchronize()
    state = profiled(tmp_path, 2, train_cuda)
    err = capfd.readouterr().err
    assert state["status"] == "applied" and "sorted by self CUDA time" in state["reason"], err
    assert "top 15 operators by self CUDA time" in err


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize("argv, shown", [
    (["--profile", "0", "train.py"], "--profile '0' is not valid"),
    (["--profile", "x", "train.py"], "--profile 'x' is not valid"),
    (["--profile=-2", "train.py"], "--profile '-2' is not valid"),
    (["--profile", "train.py"], "--profile 'train.py' is not valid"),
    (["--profile"], "argument --profile: expected one argument"),
    (["--profiles", "2", "train.py"], "unknown option '--profiles'"),
])
def test_bad_profile_option_is_rejected_naming_option_value_and_valid_choices(argv, shown, capsys):
    from shims.__main__ import main
    assert main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shims doctor: ") and shown in err.splitlines()[0]
    assert "usage: python -m shims doctor [-h] [--profile N]" in err
    assert "1 or more" in err or "is not valid" not in shown
    assert config.PROFILE_VAR not in os.environ


@pytest.mark.parametrize("value", ["0", "x", "2.5", "-1"])
def test_bad_environment_value_is_rejected(value):
    with pytest.raises(ShimsConfigError, match=rf"SHIMS_PROFILE_STEPS='{value}' is not valid; valid: a whole "
                                               r"number of optimizer steps to profile, 1 or more"):
        config.parse({"SHIMS_PROFILE_STEPS": value}, ())
    assert config.parse({"SHIMS_PROFILE_STEPS": " 3 "}, ()).profile_steps == 3
    assert config.parse({}, ()).profile_steps is None


def test_bad_environment_value_stops_the_doctor_before_the_script(tmp_path):
    script = write(tmp_path / "train.py", "raise SystemExit('the script ran')\n")
    proc = run_python(["-m", "shims", "doctor", script], env=clean_env(SHIMS_PROFILE_STEPS="0"), check=False)
    assert proc.returncode == 2
    assert "SHIMS_PROFILE_STEPS='0' is not valid" in proc.stderr and "the script ran" not in proc.stderr


# ---------------------------------------------------------------- the window: what fell inside, per-step averages

def test_the_window_says_what_fell_inside_and_averages_per_step(tmp_path):
    def evaluate_and_save(step):
        if step == 3:  # after the third optimizer step: inside the window of steps 3-4
            model = nn.Linear(8, 2).eval()
            with torch.no_grad():
                model(torch.randn(4, 8))
                model(torch.randn(4, 8))
            torch.save(model.state_dict(), tmp_path / "checkpoint.pt")
    state = profiled(tmp_path, 2, lambda: train(6, during=evaluate_and_save))
    assert state["status"] == "applied"
    profile = shims.status()["patches"]["detect"]["observed"]["profile"]
    assert profile["steps"] == 2
    assert "inside the window: 1 evaluation (2 forwards in eval mode), 1 checkpoint save(s) (torch.save)" \
        in profile["window"]
    rows = {row["name"]: row for row in profile["operators"]}
    assert rows["Optimizer.step#SGD.step"]["calls_per_step"] == 1.0
    assert not any(name.startswith("ProfilerStep") for name in rows)


def test_a_window_of_training_steps_only_says_so(tmp_path):
    profiled(tmp_path, 2, lambda: train(6))
    profile = shims.status()["patches"]["detect"]["observed"]["profile"]
    assert profile["window"].endswith("inside the window: training steps only (no evaluation, no torch.save)")
