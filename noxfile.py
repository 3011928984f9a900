"""The compatibility matrix: Python x torch x framework versions our users are pinned to.

Each combination is one nox session (uv backend) that builds its environment (torch pinned, numpy < 2 where that torch
needs it, frameworks at versions of their era), installs shims FROM THE WHEEL built from this checkout (never
editable), runs the suite from a staged copy of tests/ (so `import shims` can only find the installed wheel) and
writes .nox/results/<combination>.xml (junit) and <combination>.json (the versions it ran with).

    bash scripts/matrix.sh                  # every combination, then docs/compatibility.md's table
    bash scripts/matrix.sh oldest           # Python 3.9 + torch 2.0.1 only (what CI runs beside the main set-up)
    nox -l                                  # the sessions; nox -s tests-py310-torch22 runs one
    nox -t matrix -- -k doctr               # arguments after -- go to pytest

The uv cache (UV_CACHE_DIR) is shared by all sessions, so a repeated run only links the wheels again.
MATRIX_TREE=head tests the last commit (a snapshot by `git archive`) instead of the working tree, leaving out
unfinished edits in a shared working tree; the commit and whether the tree differed are recorded with the results.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import tarfile

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = []  # nothing by default: choose with -t matrix, -t oldest or -s

REPO = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(REPO, ".nox", "results")
# pycocotools: the DETR reference evaluates against a COCO ground truth (rfdetr brings it, but not everywhere);
# pip: the real-ColossalAI test fetches the colossalai sdists with `pip download`; setuptools: the packaging tests
# build a wheel of the checkout offline; jsonschema: the SARIF report is validated against the 2.1.0 schema;
# pandas, seaborn: what yolov5's validation imports where yolov5 is not installed (the yolo tests then install it
# without its pins: its huggingface-hub<0.25 conflicts with rfdetr's transformers)
TEST_EXTRAS = ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "timm>=0.9", "tqdm", "psutil", "pip", "pycocotools",
               "setuptools>=77", "jsonschema>=4", "pandas", "seaborn"]
# what the suite reads from the checkout besides tests/ (examples run as scripts, docs checked against the code)
STAGED = ("tests", "examples", "docs", "benchmarks", "scripts", "pyproject.toml", "README.md")

# name: (python, torch and its pins, frameworks, tags). Frameworks are the releases users of that torch sit on:
# python-doctr 0.11.0 and rfdetr need Python >= 3.10; colossalai 0.3.6 is of the torch 2.1/2.2 era; pytorch-lightning
# 1.9.5 (the last 1.x, DDP strategies default to find_unused_parameters=True) runs with torch 2.0.
COMBINATIONS = {
    "py39-torch20": ("3.9", ["torch==2.0.1", "torchvision==0.15.2", "numpy<2"],
                     ["python-doctr[torch]==0.10.0", "ultralytics==8.0.239", "pytorch-lightning==1.9.5",
                      "torchmetrics==0.11.4", "lightning-utilities==0.9.0",
                      "setuptools>=77,<81"], ["oldest"]),  # lightning-utilities 0.9 imports pkg_resources (gone in 81)
    # yolov5 7.0.14 (the yolo patch's YOLOv5 target): torch 2.2 / numpy < 2 era; its pkg_resources needs setuptools<81
    "py310-torch22": ("3.10", ["torch==2.2.2", "torchvision==0.17.2", "numpy<2"],
                      ["colossalai==0.3.6", "python-doctr==0.11.0", "ultralytics<8.2", "yolov5==7.0.14",
                       "setuptools>=77,<81"], []),
    "py311-torch25": ("3.11", ["torch==2.5.1", "torchvision==0.20.1"],
                      ["python-doctr==0.11.0", "rfdetr==1.5.2", "ultralytics<8.4"], []),
    "py311-torch214": ("3.11", ["torch==2.14.1", "torchvision==0.29.1"],
                       ["python-doctr==0.11.0", "rfdetr==1.5.2", "ultralytics>=8.3", "transformers==4.57.6",
                        "accelerate==1.16.0"], ["main"]),
    "py313-torch215": ("3.13", ["torch==2.15.0", "torchvision==0.29.2"],
                       ["python-doctr==0.11.0", "rfdetr==1.5.2", "ultralytics>=8.3"], ["newest"]),
}
REPORTED = ("torch", "torchvision", "numpy", "python-doctr", "rfdetr", "ultralytics", "yolov5", "colossalai", "timm",
            "wrapt", "packaging", "pytorch-lightning", "transformers", "accelerate")

_wheel = _tree = _provenance = None


def git(*args):
    proc = subprocess.run(["git", "-C", REPO, *args], capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def tree():
    """The sources under test: this working tree, or with MATRIX_TREE=head a snapshot of the last commit."""
    global _tree
    if _tree is None:
        _tree = REPO
        if os.environ.get("MATRIX_TREE", "worktree") == "head":
            _tree = os.path.join(REPO, ".nox", "_head")
            shutil.rmtree(_tree, ignore_errors=True)
            os.makedirs(_tree)
            with tarfile.open(fileobj=io.BytesIO(git("archive", "HEAD")), mode="r:") as archive:
                archive.extractall(_tree)
    return _tree


def provenance():
    """What was tested: the commit, and whether the working tree (when that was tested) differed from it."""
    global _provenance
    if _provenance is None:
        commit = (git("rev-parse", "--short", "HEAD") or b"?").decode().strip()
        dirty = tree() == REPO and git("status", "--porcelain", "--untracked-files=no")
        _provenance = {"commit": commit, "tree": "HEAD" if tree() != REPO else
                       "working tree" + (" with uncommitted changes" if dirty else "")}
    return _provenance


def built_wheel(session):
    """The shims wheel of the tree under test, built once per nox run (uv build, isolated; setuptools cached), and
    at the same moment a copy of what the tests read, without shims/ and patches/: every session then tests the
    same sources, even when the working tree changes while the matrix runs."""
    global _wheel
    if _wheel is None:
        out = os.path.join(REPO, ".nox", "_dist")
        shutil.rmtree(out, ignore_errors=True)  # never a wheel of an older checkout
        suite = os.path.join(out, "suite")
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in STAGED:
            source = os.path.join(tree(), name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(suite, name), ignore=skip)
            elif os.path.isfile(source):
                os.makedirs(suite, exist_ok=True)
                shutil.copy2(source, suite)
        provenance()
        session.run("uv", "build", "--wheel", "--out-dir", out, tree(), external=True, silent=True)
        (_wheel,) = glob.glob(os.path.join(out, "torch_shims-*.whl"))
    return _wheel


def stage_suite(session):
    """This session's copy of the suite taken with the wheel: the wheel is the only shims it can import."""
    suite = os.path.join(session.create_tmp(), "suite")
    shutil.rmtree(suite, ignore_errors=True)
    shutil.copytree(os.path.join(os.path.dirname(built_wheel(session)), "suite"), suite)
    return suite


def run_combination(session, name, pins, frameworks):
    # one resolution: the wheel must install beside the pinned torch without moving it (no torch requirement)
    session.install(built_wheel(session), *pins, *frameworks, *TEST_EXTRAS)
    os.makedirs(RESULTS, exist_ok=True)
    versions = os.path.join(RESULTS, f"{name}.json")
    session.run("python", "-c", "import importlib.metadata as m, json, platform, sys; v = json.loads(sys.argv[2])\n"
                "for d in sys.argv[3:]:\n"
                "    try: v[d] = m.version(d)\n"
                "    except m.PackageNotFoundError: pass\n"
                "v['python'] = platform.python_version()\n"
                "json.dump(v, open(sys.argv[1], 'w'), indent=1)", versions, json.dumps(provenance()), "torch-shims",
                *REPORTED, silent=True)
    suite = stage_suite(session)
    session.chdir(suite)
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "TEST_SHIMS_INSTALLED": "1", "TEST_SHIMS_SOURCE": tree(),
           "TEST_SHIMS_WHEEL": built_wheel(session), "PYTHONDONTWRITEBYTECODE": "1"}
    session.run("python", "-m", "pytest", "-q", "-rfEs", "--timeout", "300", f"--junitxml={RESULTS}/{name}.xml",
                "-o", f"junit_suite_name={name}", *session.posargs, env=env)


def _define(name, python, pins, frameworks, tags):
    @nox.session(name=f"tests-{name}", python=python, tags=["matrix", *tags])
    def tests(session):
        run_combination(session, name, pins, frameworks)


for _name, (_python, _pins, _frameworks, _tags) in COMBINATIONS.items():
    _define(_name, _python, _pins, _frameworks, _tags)


@nox.session(python=False, tags=["table"])
def table(session):
    """docs/compatibility.md's table from the junit files of the last run of each combination."""
    session.run("python3", os.path.join(REPO, "scripts", "compat_table.py"), RESULTS,
                "--write", os.path.join(REPO, "docs", "compatibility.md"), external=True)
