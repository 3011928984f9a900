"""The real ColossalAI LowLevelZeroOptimizer (0.3.6: the bug; 0.3.7: upstream's fix) on CPU, for tests only.

colossalai cannot be installed next to torch 2.14 (0.5.0 pins torch <= 2.5.1) and LowLevelZero asserts a CUDA/NPU
accelerator. But the optimizer reaches the device only through `colossalai.accelerator.get_accelerator()`, so with
the sdist unpacked in a cache folder (`pip download colossalai==V --no-deps`, about 1 MB, nothing installed) this
module imports the real `colossalai/zero/low_level` package and the real modules it needs (interface, the mixed
precision mixins, the grad scalers), with small stand-ins for the rest:
    colossalai.accelerator     get_accelerator(): a CPU device that answers to the name "cuda"; streams are no-ops
    colossalai.logging         get_dist_logger(): a standard logger
    colossalai.tensor.moe_tensor.api   is_moe_tensor(): False
    torch.distributed.reduce_scatter   only where gloo lacks it (torch < ~2.6): all_reduce per chunk, same sums
Package `__init__` files are not run (they import the whole framework): the packages are empty modules whose
`__path__` points at the unpacked sources. Nothing here is copied into the repository.

    python -m tests.patches.colossalai.reference.real SCENARIOS.json OUT_DIR SDIST_CACHE  (one gloo rank; see worker.py)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
import tarfile
import traceback
import types

MODULE = "colossalai.zero.low_level.low_level_optim"
PACKAGES = ("colossalai", "colossalai.zero", "colossalai.zero.low_level", "colossalai.amp", "colossalai.amp.naive_amp",
            "colossalai.tensor", "colossalai.tensor.moe_tensor")


def fetch(version, cache_dir, timeout=240):
    """The unpacked sdist root for `version` (downloaded once into cache_dir with pip). Raises RuntimeError."""
    root = os.path.join(cache_dir, f"colossalai-{version}")
    if os.path.isfile(os.path.join(root, "colossalai", "zero", "low_level", "low_level_optim.py")):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    archive = os.path.join(cache_dir, f"colossalai-{version}.tar.gz")
    if not os.path.isfile(archive):
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"colossalai=={version}", "--no-deps",
                               "--no-binary", ":all:", "-d", cache_dir], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(archive):
            raise RuntimeError(f"pip download colossalai=={version} failed: {proc.stderr[-500:]}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"colossalai-{version}/colossalai/")
                   and m.isfile() and m.name.endswith(".py")]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(cache_dir, members=members, **safe)
    return root


class CpuAccelerator:
    """What LowLevelZeroOptimizer asks of `get_accelerator()`, answered on CPU."""

    name = "cuda"  # _sanity_checks accepts only cuda or npu

    def get_current_device(self):
        import torch
        return torch.device("cpu")

    def current_stream(self, device=None):
        return None

    def stream(self, stream):
        return contextlib.nullcontext()

    def Stream(self):  # noqa: N802 - upstream's name
        return None

    def synchronize(self, device=None):
        pass


def install(root):
    """Import the real low_level_optim from the unpacked sdist `root` (forgetting any earlier colossalai modules)."""
    import importlib
    for name in [n for n in sys.modules if n == "colossalai" or n.startswith("colossalai.")]:
        del sys.modules[name]
    for name in PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = package
    accelerator = types.ModuleType("colossalai.accelerator")
    accelerator.get_accelerator = lambda: CpuAccelerator()
    dist_logging = types.ModuleType("colossalai.logging")
    dist_logging.get_dist_logger = lambda name="colossalai": logging.getLogger(name)
    moe = types.ModuleType("colossalai.tensor.moe_tensor.api")
    moe.is_moe_tensor = lambda tensor: False
    for module in (accelerator, dist_logging, moe):
        sys.modules[module.__name__] = module
    return importlib.import_module(MODULE)


def reduce_scatter_by_all_reduce(dist):
    """dist.reduce_scatter (list form, SUM) from all_reduce: the same sums, one chunk kept per rank."""

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op != dist.ReduceOp.SUM or async_op:
            raise NotImplementedError("the test stand-in does SUM, synchronously, only")
        for index, chunk in enumerate(input_list):
            reduced = chunk.clone()
            dist.all_reduce(reduced, group=group)
            if index == dist.get_rank(group):
                output.copy_(reduced)

    return reduce_scatter


def provide_reduce_scatter(dist):
    """ZeRO-2 calls dist.reduce_scatter, which gloo lacks before torch ~2.6: there, stand in with all_reduce (the
    hooks and buckets under test run unchanged). Returns (why the stand-in is used or None, whether the stand-in
    equals gloo's reduce_scatter on random chunks where gloo has one, else None)."""
    import torch
    world = dist.get_world_size()
    chunks = [torch.randn(5, generator=torch.Generator().manual_seed(dist.get_rank() * 7 + i)) for i in range(world)]
    stand_in = reduce_scatter_by_all_reduce(dist)
    mine = torch.zeros(5)
    stand_in(mine, chunks)
    try:
        native = torch.zeros(5)
        dist.reduce_scatter(native, chunks)
    except RuntimeError as exc:
        if "does not support reduce_scatter" not in str(exc):
            raise
        dist.reduce_scatter = stand_in
        return f"gloo of torch {torch.__version__} has no reduce_scatter ({exc})", None
    return None, bool(torch.equal(native, mine))


def run_scenario(scenario, rank, world, cache_dir):
    import torch

    import shims
    from shims import engine
    from tests.patches.colossalai.reference import vqgan
    engine.reset()
    module = install(fetch(scenario["version"], cache_dir))
    if scenario["shims"] != "off":
        shims.enable(patches=["colossalai"], mode=scenario["shims"])
    data = vqgan.batches(scenario["steps"], 1, world)
    model = vqgan.build_model()
    zero = module.LowLevelZeroOptimizer(vqgan.make_inner_optimizer(list(model.parameters())),
                                        reduce_bucket_size=scenario["bucket"], partition_grad=True)
    result = {"name": scenario["name"], "error": None, "weights": {}}
    try:
        for step_index, step in enumerate(data):
            loss, d_weight = vqgan.generator_loss(model, step[0][rank], use_adaptive_weight=scenario["adaptive"])
            if d_weight is not None:
                result["weights"][(step_index, 0, rank)] = float(d_weight)
            zero.backward(loss)
            zero.step()
    except Exception as exc:  # noqa: BLE001 - the failure is what some scenarios reproduce
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    result["receipt"] = shims.status()["patches"].get("colossalai")
    shims.disable()
    engine.reset()
    if rank == 0 and result["error"] is None:
        result["reference_params"], result["reference_weights"] = vqgan.reference_training(
            data, world, use_adaptive_weight=scenario["adaptive"])
    return result


def main(argv):
    import torch
    import torch.distributed as dist
    scenarios_path, out_dir, cache_dir = argv
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    with open(scenarios_path) as f:
        scenarios = json.load(f)
    try:
        stand_in_reason, stand_in_equal = provide_reduce_scatter(dist)
        for scenario in scenarios:
            result = run_scenario(scenario, rank, world, cache_dir)
            result["reduce_scatter_stand_in"], result["stand_in_equals_gloo"] = stand_in_reason, stand_in_equal
            torch.save(result, os.path.join(out_dir, f"{scenario['name']}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
