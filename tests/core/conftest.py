"""Helpers of the core tests: a tiny fake patch on a module written to tmp_path, enabled through a test-only
registry, so the engine, version and receipt tests need neither torch nor a framework."""
from __future__ import annotations

import functools
import sys
import uuid

import pytest

import shims
from shims import config, engine, registry
from shims.patch import Patch, Target
from tests.conftest import clean_env, run_python, write

TIMEOUT = 120
REAL_PATCHES = ("doctr", "detr", "ddp", "colossalai", "yolo")


@pytest.fixture(scope="module")
def patches():
    loaded = registry.load()
    assert tuple(p.name for p in loaded) == REAL_PATCHES, registry.broken()
    return loaded



TARGET_SOURCE = """
CALLS = []

def train(x):
    CALLS.append(x)
    return x * 2

def evaluate(x):
    return -x
"""


@pytest.fixture
def target(tmp_path, monkeypatch):
    """The name of a fresh, not yet imported module (defining train and evaluate) on sys.path."""
    name = f"shims_fake_target_{uuid.uuid4().hex[:8]}"
    write(tmp_path / f"{name}.py", TARGET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    engine.reset()
    sys.modules.pop(name, None)


def counting_wrapper(original, ctx):
    """The fake patch's replacement: calls the original and counts each call in the receipt (one count per layer)."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        ctx.count("calls")
        return original(*args, **kwargs)
    return wrapper


def fake_patch(module, *, name="fake", replace=counting_wrapper, targets=("train",), **kwargs):
    return Patch(name=name, summary=f"test patch {name}", replace=replace,
                 targets=tuple(t if isinstance(t, Target) else Target(module, t) for t in targets), **kwargs)


def enable(*patches, **environ):
    """Enable `patches` as the whole registry, with SHIMS_* variables `environ`; returns the receipt."""
    cfg = config.parse({k: str(v) for k, v in environ.items()}, patches)
    engine.get().enable(cfg, patches)
    return shims.status()


def target_status(name="fake", module=None, qualname="train"):
    record = shims.status()["patches"][name]
    return record["targets"][f"{module}:{qualname}"] if module else record


def calls_counted(name="fake"):
    return shims.status()["patches"][name]["counters"].get("calls", 0)


def shims_cli(*args, check=False, **env):
    return run_python(["-m", "shims", *args], env=clean_env(**env), timeout=TIMEOUT, check=check)
