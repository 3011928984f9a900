"""`python -m shims run COMMAND` / `doctor COMMAND` run a script exactly as `python script.py` runs it: the same
`__file__`, `sys.argv`, `sys.path[0]` and globals, the same traceback (from the script's own first frame), the same
exit status, and the same death by signal. Each case is run plainly and through shims, and compared."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import clean_env, write
from tests.core.conftest import TIMEOUT

SCRIPT = """
import json, os, sys
here = os.path.dirname(__file__)
os.chdir("/")
with open(os.path.join(here, "data.txt")) as f:  # paths built from __file__ hold after a chdir
    data = f.read()
print(json.dumps({"file": __file__, "argv": sys.argv, "path0": sys.path[0], "name": __name__, "data": data,
                  "spec": getattr(__spec__, "name", None), "package": __package__,
                  "globals": sorted(k for k in globals() if k.startswith("__") and k != "__shims_defined__"),
                  "main_is_here": sys.modules["__main__"].__dict__ is globals()}))
sys.stdout.flush()

def fail(how):
    if how == "raise":
        raise ValueError("the script's own error")
    if how == "exit":
        sys.exit(int(sys.argv[2]))
    if how == "exit-text":
        sys.exit("stopped: " + sys.argv[2])
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "signal":
        os.kill(os.getpid(), signal.SIGTERM)

if len(sys.argv) > 1:
    import signal
    fail(sys.argv[1])
"""


def python_in(cwd, args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=clean_env(),
                          timeout=TIMEOUT)


@pytest.fixture
def project(tmp_path):
    write(tmp_path / "sub" / "train.py", SCRIPT)
    write(tmp_path / "sub" / "data.txt", "beside the script")
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "train.py", SCRIPT)
    write(tmp_path / "pkg" / "data.txt", "beside the module")
    return tmp_path


WAYS = {
    "run": ["-m", "shims", "run"],
    "run --": ["-m", "shims", "run", "--"],
    "run python": ["-m", "shims", "run", sys.executable],
}
CASES = [[], ["raise"], ["exit", "3"], ["exit", "0"], ["exit-text", "now"], ["interrupt"], ["signal"]]


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(c) or "ends")
def test_a_script_runs_as_python_runs_it(project, way, case):
    args = ["sub/train.py", *(case or ["a b"])]
    plain = python_in(project, args)
    shimmed = python_in(project, [*WAYS[way], *args])
    assert shimmed.returncode == plain.returncode, (plain.stderr, shimmed.stderr)
    assert shimmed.stdout == plain.stdout
    assert shimmed.stderr == plain.stderr  # the traceback starts at the script's frame: no runpy or shims frames
    facts = json.loads(plain.stdout.splitlines()[0])
    assert facts["file"] == str(project / "sub" / "train.py") and facts["argv"][0] == "sub/train.py"
    assert facts["data"] == "beside the script" and facts["main_is_here"]
    if case == ["raise"]:
        assert shimmed.stderr.startswith("Traceback (most recent call last):\n  File \"" + facts["file"])
    if case in (["interrupt"], ["signal"]):
        assert shimmed.returncode == -(signal.SIGINT if case == ["interrupt"] else signal.SIGTERM)


@pytest.mark.parametrize("way", [["-m", "shims", "run", "-m"], ["-m", "shims", "run", "--", "-m"],
                                 ["-m", "shims", "run", sys.executable, "-m"]], ids=["-m", "-- -m", "python -m"])
@pytest.mark.parametrize("case", [["x", "--flag"], ["raise"], ["exit", "4"]], ids=lambda c: c[0])
def test_a_module_runs_as_python_dash_m_runs_it(project, way, case):
    plain = python_in(project, ["-m", "pkg.train", *case])
    shimmed = python_in(project, [*way, "pkg.train", *case])
    assert (shimmed.returncode, shimmed.stdout, shimmed.stderr) == (plain.returncode, plain.stdout, plain.stderr)


def test_the_doctor_runs_the_script_as_python_does(project):
    plain = python_in(project, ["sub/train.py", "raise"])
    doctor = python_in(project, ["-m", "shims", "doctor", "sub/train.py", "raise"])
    assert doctor.returncode == plain.returncode == 1
    assert doctor.stdout == plain.stdout
    assert doctor.stderr.startswith(plain.stderr), doctor.stderr  # then the doctor's table
    assert "shims doctor" in doctor.stderr[len(plain.stderr):]
    exits = python_in(project, ["-m", "shims", "doctor", "sub/train.py", "exit", "5"])
    assert exits.returncode == 5


@pytest.mark.parametrize("command", ["run", "doctor"])
def test_a_missing_script_exits_2_as_python_does_naming_the_subcommand(tmp_path, command):
    plain = python_in(tmp_path, ["nope.py"])
    proc = python_in(tmp_path, ["-m", "shims", command, "nope.py"])
    assert plain.returncode == proc.returncode == 2
    assert proc.stderr.startswith(f"shims {command}: can't open file ") and "No such file" in proc.stderr
    module = python_in(tmp_path, ["-m", "shims", command, "-m", "no_such_module_here"])
    assert module.returncode == python_in(tmp_path, ["-m", "no_such_module_here"]).returncode == 1
    assert module.stderr.startswith(f"shims {command}: No module named no_such_module_here")


def test_arguments_after_the_script_are_the_scripts_own(project):
    proc = python_in(project, ["-m", "shims", "run", "sub/train.py", "--help", "-m", "x"])
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0])["argv"] == ["sub/train.py", "--help",
                                                                                        "-m", "x"]


def test_a_program_is_started_with_shims_reaching_its_python_processes(tmp_path):
    """Any executable: its exit status is kept, and the Python processes it starts run with shims (as they do under
    `accelerate launch` or `torchrun`)."""
    proc = python_in(tmp_path, ["-m", "shims", "run", "sh", "-c", "exit 7"])
    assert proc.returncode == 7
    launcher = write(tmp_path / "launch.sh", f"#!/bin/sh\nexec {sys.executable} -c \"$@\"\n")
    os.chmod(launcher, 0o755)
    shown = "import shims, os; print(shims.status()['mode'], os.environ.get('SHIMS__BOOT'))"
    started = python_in(tmp_path, ["-m", "shims", "run", launcher, shown])
    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == ["fix", "1"]
    detect = python_in(tmp_path, ["-m", "shims", "doctor", launcher, shown])
    assert detect.stdout.split()[:2] == ["detect", "1"], detect.stderr
    assert python_in(tmp_path, ["-m", "shims", "run", "no-such-command-here"]).returncode == 127
