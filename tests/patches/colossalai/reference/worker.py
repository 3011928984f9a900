"""One gloo rank: run each scenario (reference reducer x shims mode x loss), save what happened.

    python -m tests.patches.colossalai.reference.worker SCENARIOS.json OUT_DIR  (MASTER_ADDR/PORT, RANK, WORLD_SIZE)

A scenario: {"name", "wrapper": "low_level"|"gemini", "shims": "off"|"fix"|"detect", "zero": "stage2"|"overlap",
"adaptive": bool, "micro_batches": int, "two_backwards": bool, "steps": int, "bucket": int}.
Each scenario starts from a fresh shims engine and fresh copies of the reference modules (registered under
ColossalAI's module names before shims.enable, so the patch's real targets find them). A scenario that raises is
recorded with its error; the ranks fail at the same point (the code is symmetric), before any collective of that step.
Rank 0 also runs the single-process reference and saves both results to OUT_DIR/<name>.pt.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist


def run_scenario(scenario, rank, world):
    from shims import engine

    import shims
    from tests.patches.colossalai import reference as ref
    from tests.patches.colossalai.reference import vqgan
    engine.reset()
    modules = ref.install_as_upstream()
    if scenario["shims"] != "off":
        shims.enable(patches=["colossalai"], mode=scenario["shims"])
    steps, micro_batches = scenario["steps"], scenario["micro_batches"]
    data = vqgan.batches(steps, micro_batches, world)
    model = vqgan.build_model()
    params = list(model.parameters())
    inner = vqgan.make_inner_optimizer(params)
    if scenario["wrapper"] == "low_level":
        zero = modules["low_level_optim"].LowLevelZeroOptimizer(
            inner, reduce_bucket_size=scenario["bucket"], partition_grad=scenario["zero"] == "stage2",
            overlap_communication=scenario["zero"] == "overlap")
        forward = model

        def reductions():
            return zero.queued_for_reduction
    else:
        gemini = modules["gemini_ddp"]
        ddp = gemini.GeminiDDP(model)
        zero = gemini.GeminiOptimizer(inner, ddp)
        forward = ddp

        def reductions():
            return ddp.chunk_manager.params_reduced

    result = {"name": scenario["name"], "error": None, "weights": {}, "reductions_per_step": [],
              "returned_grad_bytes": []}
    try:
        for step_index, step in enumerate(data):
            before = reductions()
            for micro_index, micro in enumerate(step):
                x = micro[rank]
                reconstruction = forward(x)
                nll = (x - reconstruction).abs().mean()
                g_loss = -model.discriminator(reconstruction).mean()
                if scenario["adaptive"]:
                    nll_grads = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
                    result["returned_grad_bytes"].append(nll_grads.untyped_storage().nbytes())
                    d_weight = vqgan.adaptive_weight(nll, g_loss, model.last_layer)
                    result["weights"][(step_index, micro_index, rank)] = float(d_weight)
                    loss = nll + d_weight * g_loss
                else:
                    loss = nll + 0.1 * g_loss
                last = micro_index == len(step) - 1
                if not last:
                    with zero.no_sync():
                        zero.backward(loss / len(step))
                else:
                    zero.backward(loss / len(step))
            if scenario["two_backwards"]:
                zero.backward(vqgan.auxiliary_loss(model, step[0][rank]) / len(step))
            zero.step()
            result["reductions_per_step"].append(reductions() - before)
    except Exception as exc:  # noqa: BLE001 - the failure is what some scenarios reproduce
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    result["n_params"] = len(params)
    result["receipt"] = shims.status()["patches"].get("colossalai")
    shims.disable()
    engine.reset()
    ref.uninstall_upstream()
    if rank == 0 and result["error"] is None:
        reference, weights = vqgan.reference_training(data, world, use_adaptive_weight=scenario["adaptive"],
                                                      two_backwards=scenario["two_backwards"])
        result["reference_params"] = reference
        result["reference_weights"] = weights
    return result


def main(argv):
    scenarios_path, out_dir = argv[0], argv[1]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    with open(scenarios_path) as f:
        scenarios = json.load(f)
    try:
        for scenario in scenarios:
            result = run_scenario(scenario, rank, world)
            torch.save(result, os.path.join(out_dir, f"{scenario['name']}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
