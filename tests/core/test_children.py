"""Processes a patched run starts (spawn children, torchrun workers), and reaching a script's functions without a
tracer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import shims
from shims import engine
from tests.conftest import SOURCE, clean_env, run_python, write
from tests.core.conftest import shims_cli, TIMEOUT, REAL_PATCHES

SPAWN_SCRIPT = """
import json, multiprocessing, sys


def child(queue):
    loaded = sys.modules.get("shims")
    queue.put({"loaded": loaded is not None, "mode": loaded.status()["mode"] if loaded else None,
               "patches": sorted(loaded.status()["patches"]) if loaded else None})


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=child, args=(queue,))
    process.start()
    result = queue.get(timeout=90)
    process.join(90)
    result["exitcode"] = process.exitcode
    print(json.dumps(result))
"""


def test_shims_run_reaches_a_multiprocessing_spawn_child(tmp_path):
    script = write(tmp_path / "spawner.py", SPAWN_SCRIPT)
    report = tmp_path / "r.json"
    proc = shims_cli("run", script, check=True, SHIMS_PATCHES="doctr", SHIMS_REPORT=report)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"loaded": True, "mode": "fix", "patches": sorted(REAL_PATCHES), "exitcode": 0}, proc.stderr
    with open(report) as f:
        assert json.load(f)["patches"]["doctr"]["status"] == "not-imported"  # the parent's receipt


def test_a_plain_spawn_child_without_shims_stays_clean(tmp_path):
    script = write(tmp_path / "spawner.py", SPAWN_SCRIPT)
    proc = run_python([script], env=clean_env(), timeout=TIMEOUT)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loaded"] is False


# a doctr-shaped loop with its dead forward, run on a stand-in model that counts its calls
DEAD_FORWARD_LOOP = """
def fit_one_epoch(model, loader):
    for x in loader:
        loss = model(x)
        loss = model(x)
    return loss
calls = []
fit_one_epoch(lambda x: calls.append(x) or x, STEPS)
"""

TORCHRUN_WORKER = """
import json, os, sys
""" + DEAD_FORWARD_LOOP.replace("STEPS", "[1, 2, 3, 4]") + """
import shims
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"forwards": len(calls), "doctr": shims.status()["patches"]["doctr"]["counters"]}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "name"])
def test_shims_run_torchrun_reaches_every_worker(tmp_path, how):
    """`python -m shims run torchrun ... train.py` (by name on PATH, or by path): torchrun's workers run train.py as
    a file, patched."""
    here = os.path.dirname(sys.executable)
    torchrun = os.path.join(here, "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun next to {sys.executable}")
    script = write(tmp_path / "train.py", TORCHRUN_WORKER)
    command = torchrun if how == "path" else "torchrun"
    proc = shims_cli("run", command, "--standalone", "--nproc_per_node", "2", script, str(tmp_path),
                     check=True, SHIMS_PATCHES="doctr", OMP_NUM_THREADS="1",
                     PATH=os.pathsep.join([here, os.environ.get("PATH", "")]))
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            result = json.load(f)
        assert result == {"forwards": 4, "doctr": {"functions_rewritten": 1, "forwards_removed": 4}}, proc.stderr


@pytest.mark.parametrize("argv0", ["SCRIPT", "-c", "-m", "-", "", "no-such-file.py"])
def test_a_child_finds_its_script_from_sys_argv_where_there_is_no_sys_orig_argv(argv0, tmp_path, monkeypatch):
    """Python 3.9 has no sys.orig_argv (torchrun workers were left unpatched there); when sitecustomize runs,
    sys.argv[0] is already the script, or -c, -m, - or '' for the other ways of running Python."""
    from shims import runner
    script = write(tmp_path / "train.py", "pass")
    monkeypatch.delattr(sys, "orig_argv", raising=False)
    monkeypatch.setattr(sys, "argv", [script if argv0 == "SCRIPT" else argv0, "--nproc", "2"])
    assert runner._script_from_argv() == (script if argv0 == "SCRIPT" else None)


def test_disable_withdraws_the_bootstrap_from_child_processes():
    shims.enable(patches=["doctr"])
    assert os.environ.get("SHIMS__BOOT") == "1"
    assert engine.BOOTSTRAP_DIR in os.environ["PYTHONPATH"].split(os.pathsep)
    assert os.environ.get("SHIMS_PATCHES") == "doctr"
    shims.disable()
    assert "SHIMS__BOOT" not in os.environ
    assert engine.BOOTSTRAP_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep)


def test_disable_gives_the_environment_back_and_enable_reads_the_users_environment(monkeypatch):
    """enable(...) exports its settings for child processes; disable() must not leave them to the next enable()."""
    for key in [k for k in os.environ if k.startswith("SHIMS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SHIMS_DISABLE", "ddp")
    engine.reset()
    try:
        shims.enable(patches=["doctr"], strict=True)
        assert os.environ["SHIMS_PATCHES"] == "doctr" and os.environ["SHIMS__BOOT"] == "1"
        shims.enable()  # the user's environment again (SHIMS_DISABLE=ddp), not what the first call exported
        assert engine.get().config.patches == ("doctr", "detr", "colossalai", "yolo") and not engine.get().config.strict
        shims.disable()
        assert {k: v for k, v in os.environ.items() if k.startswith("SHIMS_")} == {"SHIMS_DISABLE": "ddp"}
    finally:
        engine.reset()



WATCHED_SCRIPT = """
{first_line}
import sys
TRACED_DURING_MODULE_CODE = sys.gettrace() is not None
""" + DEAD_FORWARD_LOOP.replace("STEPS", "[1, 2, 3]") + """
import json, shims
print(json.dumps({{"traced": TRACED_DURING_MODULE_CODE, "tracer_after": sys.gettrace() is not None,
                  "forwards": len(calls), "counters": shims.status()["patches"]["doctr"]["counters"]}}))
raise SystemExit(0 if len(sys.argv) < 2 else int("the last line raises here"))
"""


def test_shims_run_reaches_the_script_without_a_tracer_and_keeps_line_numbers(tmp_path):
    """`python -m shims run` compiles the script with a call after the def: imports run with no trace hook."""
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line="pass"))
    out = run_python(["-m", "shims", "run", script], env=clean_env(SHIMS_PATCHES="doctr"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}
    failed = run_python(["-m", "shims", "run", script, "boom"], env=clean_env(SHIMS_PATCHES="doctr"), check=False)
    assert failed.returncode == 1
    with open(script) as f:
        last_line = len(f.read().splitlines())
    assert f'File "{script}", line {last_line}, in <module>' in failed.stderr, failed.stderr


def _other_pythons():
    """CPython 3.12+ interpreters on this machine (sys.monitoring), besides the one running the tests."""
    import glob
    import shutil
    found = {}
    for minor in range(12, 16):
        for candidate in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python"))) + [
                shutil.which(f"python3.{minor}")]:
            if not candidate or f"3.{minor}" in found:
                continue
            try:  # a pyenv shim on PATH may exist without working
                probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                       capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0 and probe.stdout.strip() == f"(3, {minor})":
                found[f"3.{minor}"] = candidate
    return found


def copy_wrapt_for_another_python(root):
    """wrapt, shims' runtime dependency, beside a copied shims for another interpreter: its pure-Python code (the C
    extension is built for this Python; wrapt falls back to Python when it cannot load it)."""
    import shutil
    import wrapt
    shutil.copytree(os.path.dirname(wrapt.__file__), root / "wrapt", ignore=shutil.ignore_patterns("*.so", "*.pyd"))


@pytest.mark.parametrize("how", ["import-shims-auto", "booted-child"])
@pytest.mark.parametrize("minor", ["3.12", "3.13"])
def test_scripts_are_watched_with_sys_monitoring_on_python_312_and_later(minor, how, tmp_path):
    """From 3.12 only the script's own code object is watched, no global trace hook: for the first-line import, and
    for a child process that the interpreter runs as a file (a torchrun worker) booted by shims' sitecustomize."""
    python = _other_pythons().get(minor)
    if python is None:
        pytest.skip(f"no Python {minor} interpreter on this machine (looked on PATH and in ~/.pyenv)")
    import shutil
    root = tmp_path / "site"
    shutil.copytree(os.path.join(SOURCE, "shims"), root / "shims")  # shims and its patches, as installed,
    shutil.copytree(os.path.join(SOURCE, "patches"), root / "shims" / "patches")  # for that interpreter
    copy_wrapt_for_another_python(root)
    first_line = "import shims.auto" if how == "import-shims-auto" else "pass"
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line=first_line))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(root), "SHIMS_PATCHES": "doctr",
           "PYTHONNOUSERSITE": "1"}
    if how == "booted-child":  # what config.export_for_children leaves for a child process
        env.update({"SHIMS__BOOT": "1", "SHIMS__PARENT_PID": "1",
                    "PYTHONPATH": os.pathsep.join([str(root / "shims" / "startup" / "bootstrap"), str(root)])})
    proc = subprocess.run([python, script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}


def test_import_shims_auto_on_this_python_runs_the_script_with_no_tracer(tmp_path):
    """3.9-3.11: the rest of the script runs compiled (shims/startup/takeover.py); 3.12+: sys.monitoring. Details
    and the fallbacks: tests/startup/."""
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line="import shims.auto"))
    out = run_python([script], env=clean_env(SHIMS_PATCHES="doctr"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}
