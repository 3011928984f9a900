"""Reference code for the colossalai patch's tests: ColossalAI-shaped reducers written here, and their launcher.

low_level_optim.py  a bucketed ZeRO reducer shaped like LowLevelZeroOptimizer 0.3.1-0.3.6 (tensor hooks)
gemini_ddp.py       a Gemini-style wrapper whose tensor hook does the whole reduction (GeminiDDP up to 0.5.0)
vqgan.py            a tiny VQGAN and taming-transformers' adaptive-weight loss (two autograd.grad calls per step)
worker.py           one rank of a 2-process gloo run over a list of scenarios
real.py             the real ColossalAI 0.3.6 / 0.3.7 LowLevelZeroOptimizer on CPU (downloaded sdist, stubs)

`install_as_upstream()` loads fresh copies of the reference modules under ColossalAI's module names, so the patch's
real targets (`colossalai.zero.low_level.low_level_optim:LowLevelZeroOptimizer._attach_reduction_hook`, ...) find them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UPSTREAM_NAMES = {
    "low_level_optim": "colossalai.zero.low_level.low_level_optim",
    "gemini_ddp": "colossalai.zero.gemini.gemini_ddp",
}


def install_as_upstream():
    """Fresh module objects for the references, registered in sys.modules under ColossalAI's names. Returns
    {"low_level_optim": module, "gemini_ddp": module}. Call before shims.enable(...) so the patch finds them."""
    modules = {}
    for short, upstream in UPSTREAM_NAMES.items():
        spec = importlib.util.spec_from_file_location(upstream, os.path.join(HERE, f"{short}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[upstream] = module
        spec.loader.exec_module(module)
        modules[short] = module
    return modules


def uninstall_upstream():
    for upstream in UPSTREAM_NAMES.values():
        sys.modules.pop(upstream, None)


def run_ranks(module_args, env, world=2, timeout=240):
    """Run `python -m <module_args...>` as `world` gloo ranks on 127.0.0.1 with a hard timeout (both are killed when
    it passes). Returns [(returncode, stdout, stderr)] per rank; raises AssertionError on a timeout."""
    from tests.conftest import free_port  # here, in the launching test process (ranks never import it)
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = []
        for proc in procs:
            out, err = proc.communicate()
            tails.append(f"--- rank stdout\n{out[-2000:]}\n--- rank stderr\n{err[-3000:]}")
        raise AssertionError(f"ranks did not finish within {timeout} s\n" + "\n".join(tails)) from None
    return results
