"""Helpers of the start-up tests: run a script on this Python and on pyenv's other Pythons (source checkout on
PYTHONPATH, no torch needed: the doctr patch rewrites a stand-in loop), with `import shims.auto`, the traced
fallback or `pass` on its first line."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, SOURCE, TESTS, clean_env, write

TIMEOUT = 120
FIRST_LINES = {"shims": "import shims.auto", "bare": "pass"}


def _interpreters():
    found = {"this": sys.executable}
    for minor in ("3.9", "3.10", "3.11", "3.12"):
        if sys.version.startswith(minor + "."):
            continue
        for candidate in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python"))):
            found[minor] = candidate
            break
    return found


INTERPRETERS = _interpreters()
ALL = list(INTERPRETERS)


def _site_for(python, tmp_path):
    """PYTHONPATH entries that make shims importable by `python` from the source checkout: the checkout, plus
    shims' pure-Python dependencies linked from this interpreter when `python` lacks them."""
    entries = [REPO, TESTS]
    if python == sys.executable:
        return entries
    entries = [SOURCE, TESTS]  # the matrix stages tests/ without the sources (conftest.SOURCE)
    missing = subprocess.run([python, "-c", "import importlib.util as u; print(' '.join(n for n in "
                              "('wrapt', 'packaging') if u.find_spec(n) is None))"],
                             capture_output=True, text=True, timeout=TIMEOUT).stdout.split()
    if missing:
        site = tmp_path / "deps"
        site.mkdir(exist_ok=True)
        for name in missing:
            try:
                module = __import__(name)
            except ImportError:
                pytest.skip(f"{name} is importable neither by {python} nor by the test interpreter")
            link = site / name
            if not link.exists():
                os.symlink(os.path.dirname(module.__file__), link)  # wrapt falls back to pure Python elsewhere
        entries.append(str(site))
    return entries


def python_for(which):
    python = INTERPRETERS.get(which)
    if python is None:
        pytest.skip(f"no Python {which} interpreter on this machine (looked in ~/.pyenv)")
    return python


def env_for(which, tmp_path, extra_path=(), **extra):
    """The environment a script runs in: SHIMS_PATCHES=doctr, shims from the checkout, nothing else of shims."""
    env = clean_env(SHIMS_PATCHES="doctr", **extra)
    env["PYTHONPATH"] = os.pathsep.join([*_site_for(python_for(which), tmp_path), *extra_path])
    env.pop("PYTHONUNBUFFERED", None)  # as a user runs it: stdout block-buffered into the pipe
    return env


def run(which, args, tmp_path, *, stdin=None, cwd=None, extra_path=(), merge=False, **extra):
    """`python ARGS` on the Python named `which`; `merge`: stderr into stdout, as `2>&1` does."""
    env = env_for(which, tmp_path, extra_path, **extra)
    return subprocess.run([python_for(which), *args], env=env, input=stdin, cwd=cwd or str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                          text=True, timeout=TIMEOUT)


# the module the script imports: was a tracer running while the script's imports ran?
PROBE = """
import sys
def nested():
    return sys.gettrace()
TRACED = sys.gettrace() is not None or nested() is not None


def compiled():
    # whether shims runs the script compiled (its watch of the script is a CompiledWatch)
    import os
    main = sys.modules["__main__"]
    watched = getattr(sys.modules.get("shims.startup.mainwatch"), "_WATCHED", {})
    path = getattr(main, "__file__", None)
    return path is not None and type(watched.get(os.path.realpath(path))).__name__ == "CompiledWatch"
"""

# line 1 is FIRST; the doctr-shaped loop makes shims reach the script (a stand-in model counts forwards); what the
# run was like goes to a side file, so stdout and stderr are the script's own
SCRIPT = """{first}
import atexit, json, os, sys, threading
import startup_probe
from startup_probe import compiled


def fit_one_epoch(model, loader):
    for x in loader:
        loss = model(x)
        loss = model(x)
    return loss


calls = []
fit_one_epoch(lambda x: calls.append(x) or x, [1, 2, 3])
with open(os.environ["STARTUP_SIDE"], "w") as f:
    json.dump({{"traced": startup_probe.TRACED, "tracer_after": sys.gettrace() is not None,
               "compiled": compiled(), "forwards": len(calls)}}, f)
{ending}
"""

def write_case(tmp_path, first, ending, name="train.py"):
    write(tmp_path / "startup_probe.py", PROBE)
    return write(tmp_path / name, SCRIPT.format(first=first, ending=ending))


def side(tmp_path):
    with open(tmp_path / "side.json") as f:
        return json.load(f)
