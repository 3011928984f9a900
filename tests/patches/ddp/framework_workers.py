"""One rank of the framework tests: the transformers Trainer, accelerate and Lightning 1.x building DDP, on gloo.

    python tests/patches/ddp/framework_workers.py FRAMEWORK --rank R --world 2 --port P --out DIR --cases JSON

Each case configures shims in-process (as SHIMS_* variables would), trains a tiny model built from a config (nothing
from a hub) and records the flags DDP was built with, the ddp receipt and the final parameters; DIR/rank{R}.json and
DIR/rank{R}.pt. The lines the advice must name carry a `# marker` comment (tests read them with marker_line).

Cases (JSON): name, mode (fix|detect), observe (SHIMS_DDP_OBSERVE), model ("bert": a PreTrainedModel whose every
parameter is used; "extra": a plain module with a layer it never uses), accumulate (gradient accumulation steps),
knob (the user's find_unused_parameters: null = the framework's default), freeze (freeze the unused layer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
STEPS = 6


def tiny_bert(torch):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def extra_model(torch):
    """Not a PreTrainedModel (the Trainer then always asks for find_unused_parameters=True); `extra` is never used."""
    from torch import nn

    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.extra = nn.Linear(16, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, input_ids, labels=None, **kwargs):
            logits = self.head(self.embed(input_ids).mean(1))
            loss = nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    torch.manual_seed(0)
    return WithExtra()


def dataset(torch, n=48):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def build(torch, case):
    model = tiny_bert(torch) if case.get("model", "bert") == "bert" else extra_model(torch)
    if case.get("freeze"):
        model.extra.requires_grad_(False)
    return model


def run_trainer(torch, case, out):
    from transformers import Trainer, TrainingArguments
    model = build(torch, case)
    args = TrainingArguments(output_dir=os.path.join(out, case["name"]), use_cpu=True, max_steps=STEPS,
                             per_device_train_batch_size=4, gradient_accumulation_steps=case.get("accumulate", 1),
                             learning_rate=1e-2, save_strategy="no", report_to=[], logging_strategy="no", seed=0,
                             data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             ddp_find_unused_parameters=case.get("knob"))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(torch))
    trainer.train()  # trainer-train
    return model, trainer.model_wrapped


def run_accelerate(torch, case):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    knob = case.get("knob")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=knob)] if knob is not None else []
    accelerator = Accelerator(cpu=True, kwargs_handlers=handlers)
    model = build(torch, case)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = dataset(torch)
    ddp, optimizer = accelerator.prepare(model, optimizer)  # accelerate-prepare
    rank = accelerator.process_index
    for step in range(STEPS):
        batch = data[8 * step + 4 * rank: 8 * step + 4 * rank + 4]
        ids = torch.stack([b["input_ids"] for b in batch])
        labels = torch.stack([b["labels"] for b in batch])
        output = ddp(input_ids=ids, labels=labels)
        loss = output["loss"] if isinstance(output, dict) else output.loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return model, ddp


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=("trainer", "accelerate"))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="[]")
    opts = parser.parse_args(argv)
    os.environ.update(RANK=str(opts.rank), LOCAL_RANK=str(opts.rank), WORLD_SIZE=str(opts.world),
                      LOCAL_WORLD_SIZE=str(opts.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(opts.port))
    import datetime

    import torch
    import torch.distributed as dist

    import shims
    from shims import engine
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=opts.rank, world_size=opts.world, timeout=datetime.timedelta(seconds=60))
    results, states, code = {}, {}, 0
    for case in json.loads(opts.cases):
        engine.reset()
        for key in [k for k in os.environ if k.startswith("SHIMS_")]:
            del os.environ[key]
        shims.enable(patches=["ddp"], mode=case.get("mode", "fix"),
                     options={"SHIMS_DDP_OBSERVE": str(case.get("observe", 4))})
        result = {"error": None}
        try:
            if opts.framework == "trainer":
                model, ddp = run_trainer(torch, case, opts.out)
            else:
                model, ddp = run_accelerate(torch, case)
            result["find_unused_parameters"] = getattr(ddp, "find_unused_parameters", None)
            states[case["name"]] = {k: v.detach().clone() for k, v in model.named_parameters()}
            from shims.patches.ddp.observation import finish_all
            finish_all()
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            import traceback
            result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            code = 3
        result["receipt"] = shims.status()["patches"].get("ddp")
        results[case["name"]] = result
        dist.barrier()
    engine.reset()
    torch.save(states, os.path.join(opts.out, f"rank{opts.rank}.pt"))
    with open(os.path.join(opts.out, f"rank{opts.rank}.json"), "w") as f:
        json.dump({"rank": opts.rank, "cases": results}, f, indent=1, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
