"""Shared test fixtures: a clean shims engine per test, and a bounded subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
PYTHON = sys.executable
# helper modules in tests/ are importable both as `tests.x` and as top-level `x`
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def free_port():
    """A TCP port free on 127.0.0.1 now (for a gloo rendezvous of ranks started by a test)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _patches_importable():
    """A source checkout on PYTHONPATH (the matrix environments under /work/envs) has no `shims.patches` until the
    registry maps patches/ onto it; tests import `shims.patches.X` at collection, so map it now."""
    import importlib.util
    if importlib.util.find_spec("shims.patches") is None:
        from shims import registry
        registry.load()


_patches_importable()

# the checkout's sources, for tests that build a wheel or copy shims/ (the matrix stages tests/ without them)
SOURCE = os.environ.get("TEST_SHIMS_SOURCE") or REPO
if os.environ.get("TEST_SHIMS_INSTALLED") == "1":  # the matrix: the suite must test the installed wheel
    import shims as _shims
    if "site-packages" not in _shims.__file__:
        raise pytest.UsageError(f"TEST_SHIMS_INSTALLED=1 but shims is imported from {_shims.__file__}")


@pytest.fixture(autouse=True)
def clean_shims(monkeypatch):
    """Every test starts and ends with shims disabled, no SHIMS_* variables and no bootstrap on PYTHONPATH."""
    for key in list(os.environ):
        if key.startswith("SHIMS_"):
            monkeypatch.delenv(key, raising=False)
    from shims import engine
    engine.reset()
    saved_pythonpath = os.environ.get("PYTHONPATH")
    yield
    engine.reset()
    for key in list(os.environ):
        if key.startswith("SHIMS_"):
            os.environ.pop(key, None)
    if saved_pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved_pythonpath


# variables a framework sets in os.environ when it is imported, and that would then reach every child a later test
# starts: ultralytics (utils/__init__.py) sets TORCH_CPP_LOG_LEVEL=ERROR, which silences the C++ warnings of torch
# (DDP's "did not find any unused parameters" among them) in every rank a DDP test launches after it
IMPORT_LEAKS = ("TORCH_CPP_LOG_LEVEL", "KINETO_LOG_LEVEL", "TF_CPP_MIN_LOG_LEVEL", "NUMEXPR_MAX_THREADS")
STARTUP_ENV = {k: os.environ[k] for k in IMPORT_LEAKS if k in os.environ}


def clean_env(**extra):
    """os.environ without SHIMS_* and the shims bootstrap (PYTHONPATH = repo and tests/), with the variables of
    IMPORT_LEAKS as the suite started, plus `extra` (values converted to str)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_") and not k.startswith("PYTEST_")}
    for key in IMPORT_LEAKS:
        if key in STARTUP_ENV:
            env[key] = STARTUP_ENV[key]
        else:
            env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS])  # never the shims bootstrap: a child starts clean
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(args, *, env=None, cwd=None, timeout=180, check=True):
    """Run `python ARGS` in a subprocess with a hard timeout (tests must never hang CI). Returns CompletedProcess."""
    proc = subprocess.run([PYTHON, *args], env=env if env is not None else clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def write(path, text):
    """Write dedented `text` to `path` (creating folders); returns the path as str."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return str(path)


@pytest.fixture
def optimizer_classes_restored():
    """torch 2.0-2.2: the first torch.compile in a process rewrites every torch.optim class's step and zero_grad
    (TorchPatcher). Put them back after the test, so later tests see torch as a fresh process has it (detect mode's
    step clock after a compile is tested in a fresh process: tests/detect/test_steps_after_compile.py)."""
    import torch
    classes = [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    names = ("step", "zero_grad")
    saved = {(c, n): c.__dict__[n] for c in classes for n in names if n in c.__dict__}
    marks = {key: fn.__dict__.get("hooked") for key, fn in saved.items() if hasattr(fn, "__dict__")}
    yield
    for c in classes:
        for n in names:
            if (c, n) in saved:
                setattr(c, n, saved[(c, n)])
            elif n in c.__dict__:
                delattr(c, n)
    for key, mark in marks.items():  # TorchPatcher also marks the bare functions `hooked`: never wrapped again
        if mark is None:
            saved[key].__dict__.pop("hooked", None)
        else:
            saved[key].hooked = mark


def marker_line(path, marker):
    """`path:N` of the one line of `path` that carries `# marker` in a comment (findings name file:line)."""
    with open(path) as f:
        lines = [n for n, text in enumerate(f, 1) if f"# {marker}" in text]
    assert len(lines) == 1, f"marker {marker!r} must appear once in {path}, found {len(lines)}"
    return f"{path}:{lines[0]}"
