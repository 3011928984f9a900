"""The example plug-in (examples/swa_bn_plugin) installed with pip from its folder into a virtual environment made
here, with no change to shims: discovered, listed with its origin, applied, disabled, in the receipt, and its own
tests (written with shims.testing) pass there.

The environment sees this interpreter's packages (torch, shims) through a .pth file; the plug-in itself goes into
the new environment only. pip runs offline (--no-index, --no-build-isolation: this interpreter's setuptools builds
it); where that cannot build, the test skips and says why.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env, write

EXAMPLE = os.path.join(REPO, "examples", "swa_bn_plugin")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = str(root / "venv" / "bin" / "python")
    own_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # this interpreter's packages, after the environment's own (addsitedir also runs their .pth files)
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    write(os.path.join(own_site, "outer_packages.pth"),
          "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer) + "\n")
    env = clean_env(PYTHONPATH=REPO)
    proc = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "-q",
                           EXAMPLE], capture_output=True, text=True, timeout=600, env=env, cwd=str(root))
    if proc.returncode != 0 and ("No module named pip" in proc.stderr or "setuptools" in proc.stderr):
        pytest.skip(f"pip cannot build the example offline here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = os.listdir(own_site)
    assert any(n.startswith("shims_swa_bn-0.1.0.dist-info") for n in installed), installed
    return python, root


def run_in(venv, args, **env):
    python, root = venv
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=600, cwd=str(root),
                          env=clean_env(PYTHONPATH=REPO, NO_ALBUMENTATIONS_UPDATE="1", **env))


SCRIPT = '''
import shims.auto
import json, sys
sys.path.insert(0, sys.argv[1])
plugin_loaded_before_torch = "shims_swa_bn" in sys.modules
import torch
import swa_reference
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
graphs = []
model.register_forward_hook(lambda m, a, out: graphs.append(out.grad_fn is not None))
swa_reference.bn_update([(torch.randn(8, 4), None) for _ in range(3)], model)
import shims
print(json.dumps({"before_torch": plugin_loaded_before_torch, "graphs": graphs,
                  "receipt": shims.status()["patches"]["swa_bn"]}))
'''


def test_installed_plug_in_is_discovered_applied_disabled_and_in_the_receipt(venv, tmp_path):
    script = write(tmp_path / "train.py", SCRIPT)
    tests = os.path.join(EXAMPLE, "tests")
    proc = run_in(venv, [script, tests], SHIMS_SWA_BN_MODULES="swa_reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["before_torch"] is False  # imported with its trigger, torch, not at `import shims.auto`
    assert seen["graphs"] == [False, False, False]  # the pass ran without building a graph
    receipt = seen["receipt"]
    assert receipt["origin"] == "plug-in shims-swa-bn 0.1.0 (shims.patches: swa_bn = shims_swa_bn:PATCH)"
    assert receipt["targets"]["swa_reference:bn_update"] == {"status": "applied", "reason": ""}
    assert receipt["targets"]["torch.optim.swa_utils:update_bn"]["status"] == "fixed-upstream"
    assert receipt["counters"] == {"passes_without_grad": 1}

    proc = run_in(venv, [script, tests], SHIMS_SWA_BN_MODULES="swa_reference", SHIMS_DISABLE="swa_bn")
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["graphs"] == [True, True, True]  # as written: a graph per batch
    assert seen["receipt"]["status"] == "disabled" and seen["receipt"]["reason"] == "listed in SHIMS_DISABLE"


def test_list_shows_the_installed_plug_in(venv):
    proc = run_in(venv, ["-m", "shims", "list"], COLUMNS="300")  # one line per fact, nothing wrapped
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = proc.stdout[proc.stdout.index("swa_bn: "):]
    assert "  from: plug-in shims-swa-bn 0.1.0 (shims.patches: swa_bn = shims_swa_bn:PATCH)" in block
    assert "torch.optim.swa_utils:update_bn" in block and "SHIMS_SWA_BN_MODULES=utils, swa_utils" in block


def test_the_example_s_own_tests_pass_with_shims_testing(venv):
    proc = run_in(venv, ["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(EXAMPLE, "tests")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
