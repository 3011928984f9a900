"""Installing the shims wheel into an environment with an older torch leaves that torch as it was.

The subject is an environment whose torch predates everything shims once required (torch < 2.1: no
register_post_accumulate_grad_hook): $TEST_SHIMS_OLD_TORCH_PYTHON, or this interpreter when its torch is that old
(the matrix's Python 3.9 + torch 2.0.1 combination). pip's resolver is asked, with `--dry-run --report`, what it would
install there for the wheel; nothing in that environment is changed. The wheel is $TEST_SHIMS_WHEEL (the matrix
passes the one it installed) or built here from the checkout.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import SOURCE, clean_env

TORCH_STACK = ("torch", "torchvision", "numpy", "triton")


def old_torch_python():
    explicit = os.environ.get("TEST_SHIMS_OLD_TORCH_PYTHON")
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.skip(f"TEST_SHIMS_OLD_TORCH_PYTHON={explicit} is not an executable")
        return explicit
    import torch
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return sys.executable
    pytest.skip(f"no environment with a torch older than 2.1 here (this one has {torch.__version__}): set "
                "TEST_SHIMS_OLD_TORCH_PYTHON, or run `bash scripts/matrix.sh oldest`")


def run(args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    given = os.environ.get("TEST_SHIMS_WHEEL")
    if given:
        return given
    if not os.path.isfile(os.path.join(SOURCE, "pyproject.toml")):
        pytest.skip(f"no shims checkout at {SOURCE} to build a wheel from (set TEST_SHIMS_SOURCE or TEST_SHIMS_WHEEL)")
    out = tmp_path_factory.mktemp("wheel")
    try:
        import setuptools  # noqa: F401 - present: build offline without an isolated build environment
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []  # pip fetches setuptools from the package index
    proc = run([sys.executable, "-m", "pip", "wheel", SOURCE, "--no-deps", *isolation, "-w", str(out)])
    wheels = glob.glob(str(out / "torch_shims-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot build the shims wheel here (offline without setuptools?): {proc.stderr[-500:]}")
    return wheels[0]


def torch_version(python):
    proc = run([python, "-c", "import torch; print(torch.__version__)"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_wheel_install_leaves_an_older_torch_as_it_was(wheel, tmp_path):
    python = old_torch_python()
    before = torch_version(python)
    report = tmp_path / "report.json"
    proc = run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), wheel])
    if proc.returncode != 0 and any(word in proc.stderr for word in ("connection", "Connection", "resolve host")):
        pytest.skip(f"pip could not reach the package index to resolve the wheel's dependencies: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert not {name for name in planned if name in TORCH_STACK or name.startswith("nvidia-")}, planned
    assert set(planned) <= {"torch-shims", "wrapt", "packaging"}, planned  # shims' own runtime dependencies at most
    assert torch_version(python) == before  # not a check of shims (a dry run installs nothing): the env is intact


def test_wheel_declares_no_torch_requirement(wheel):
    import zipfile
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if r.split(";")[0].strip().lower().startswith("torch")], runtime
    assert any(r.lower().startswith("wrapt") for r in runtime), runtime  # wrapt underneath

@pytest.mark.slow
def test_the_wheel_installs_patches_as_shims_patches_never_as_a_top_level_package(tmp_path):
    """`pip install .` gives `shims` with `shims.patches`; no top-level `patches` lands in site-packages."""
    import zipfile
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", SOURCE, "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment, so the wheel cannot be built offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("torch_shims-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"shims", wheel.name.split("-")[0] + "-" +
                                                wheel.name.split("-")[1] + ".dist-info"}
    for patch in ("doctr", "detr", "ddp", "colossalai", "yolo"):
        assert f"shims/patches/{patch}.py" in names or f"shims/patches/{patch}/__init__.py" in names
    assert "shims/startup/bootstrap/sitecustomize.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    check = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2:];"
         "import importlib.util, shims.auto, shims.patches.doctr;"
         "print(shims.auto.__file__.startswith(sys.argv[1]), importlib.util.find_spec('patches') is None,"
         " sorted(shims.status()['patches']))", str(target)] + [p for p in sys.path if "site-packages" in p],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env(PYTHONPATH=""))
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["True", "True", "['colossalai',", "'ddp',", "'detr',", "'doctr',", "'yolo']"], check.stdout
