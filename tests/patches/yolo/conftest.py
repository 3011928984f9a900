"""Shared by the yolo tests: ultralytics releases installed beside each other (`pip install --no-deps --target`, the
rest of ultralytics' requirements from this environment), and recorded training runs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from tests.conftest import REPO, clean_env

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "ultralytics_run.py")
CACHE = os.environ.get("YOLO_RELEASE_CACHE") or os.path.expanduser("~/.cache/shims-tests/ultralytics")
BUGGY, FIXED = "8.4.61", "8.4.62"  # the last release with `model.half()` in the validator, the first without


def cpu_float16(autocast):
    """Whether this torch runs a Conv2d in float16 on the CPU under autocast (`autocast=True`), or, on a model cast
    with .half() (the unpatched validator's path), a Conv2d and then a nearest upsample of its channels-last output
    (a YOLO neck; torch 2.2's CPU build has no float16 kernel for that upsample)."""
    import torch
    conv = torch.nn.Conv2d(3, 4, 3)
    upsample = torch.nn.Upsample(scale_factor=2, mode="nearest")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if autocast:
                with torch.autocast("cpu", dtype=torch.float16):
                    return conv(torch.ones(1, 3, 8, 8)).dtype == torch.float16
            out = conv.half()(torch.ones(1, 3, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last))
            return out.dtype == torch.float16 and upsample(out).dtype == torch.float16
    except (RuntimeError, NotImplementedError):
        return False


def needs_cpu_half():
    """skipif marker: the unpatched half path (a float16 model on the CPU) cannot run on this torch."""
    import torch
    return pytest.mark.skipif(not cpu_float16(autocast=False), reason=(
        f"torch {torch.__version__} lacks a float16 CPU kernel a YOLO model runs (Conv2d, or nearest upsample in "
        "channels-last): the unpatched half path cannot run here"))


def release(version):
    """A folder holding ultralytics `version` (installed once into the cache); skips with the reason when the
    registry cannot be reached or ultralytics' requirements are not in this environment."""
    try:
        import ultralytics  # noqa: F401 - the installed one brings the requirements both releases share
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"ultralytics is not importable here ({type(exc).__name__}: {exc}): its requirements are missing")
    target = os.path.join(CACHE, version)
    if not os.path.isdir(os.path.join(target, "ultralytics")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                               f"ultralytics=={version}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"pip could not install ultralytics=={version} into {target}: {proc.stderr.strip()[-300:]}")
    importable(target, "ultralytics", version)
    return target


def importable(folder, package, version):
    """Skips, saying why, when `package` from `folder` lacks a requirement here (some are imported only late, e.g.
    ultralytics 8.4's polars when a checkpoint is saved) or does not import."""
    import glob
    import importlib.metadata
    from packaging.requirements import Requirement
    top = package.split(".")[0]
    for meta in glob.glob(os.path.join(folder, f"{top}-*.dist-info", "METADATA")):
        with open(meta, encoding="utf-8") as f:
            wanted = [Requirement(line.split(":", 1)[1].strip()) for line in f if line.startswith("Requires-Dist:")]
        for req in wanted:
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if req.name in ("setuptools",) or os.path.isdir(os.path.join(folder, req.name.replace("-", "_"))):
                continue
            try:
                importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                if top == "yolov5" and req.name not in ("pandas", "seaborn", "ultralytics", "torch", "torchvision"):
                    continue  # yolov5 pins much that validation never imports (boto3, sahi, roboflow...)
                pytest.skip(f"{package} {version} requires {req.name}, which is not installed here")
    env = clean_env(YOLO_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([folder, env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"{package} {version} does not import with this environment's requirements: {last}")


def yolov5_package(version="7.0.14"):
    """A folder holding the `yolov5` package (installed once, without its requirements: the ones it imports for
    validation are this environment's, plus setuptools < 81 for its `import pkg_resources`); skips with the reason."""
    for name in ("pandas", "seaborn", "ultralytics"):
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"yolov5 {version} imports {name}, which is not importable here ({type(exc).__name__})")
    import importlib.util
    spec = importlib.util.find_spec("yolov5")
    if spec is not None and spec.origin:  # installed (the matrix row that has it): its own folder
        return os.path.dirname(os.path.dirname(spec.origin))
    target = os.path.join(os.path.dirname(CACHE), "yolov5", version)
    if not os.path.isdir(os.path.join(target, "yolov5")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                               f"yolov5=={version}", "setuptools<81"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"pip could not install yolov5=={version} into {target}: {proc.stderr.strip()[-300:]}")
    importable(target, "yolov5.val", version)
    return target


def recorded_run(tmp_root, version, *flags, timeout=600, runner=RUNNER):
    """Run tests/patches/yolo/ultralytics_run.py with ultralytics `version` first on the path (or `runner` with the
    folder `version` names first); returns its record."""
    import torch
    out = os.path.join(tmp_root, "record.pt")
    env = clean_env(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=os.path.join(tmp_root, "settings"))
    env["PYTHONPATH"] = os.pathsep.join([version if os.path.isdir(version) else release(version), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, runner, out, "--root", str(tmp_root), *flags], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{version} {flags} exited {proc.returncode}\n{proc.stderr[-5000:]}"
    kwargs = {"weights_only": False} if "weights_only" in torch.load.__code__.co_varnames else {}
    return torch.load(out, **kwargs)


def bitwise_equal(a, b):
    """Two state dicts with the same keys, dtypes and bits."""
    import torch
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
