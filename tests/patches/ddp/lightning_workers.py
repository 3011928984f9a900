"""A Lightning 1.x user's script, on the CPU with 2 processes: Lightning starts the other rank itself.

    python tests/patches/ddp/lightning_workers.py STRATEGY OUT CASES_JSON

STRATEGY is "ddp" (this process is rank 0 and Lightning re-runs this script for rank 1) or "ddp_spawn" (Lightning
spawns both ranks). Each case configures shims in-process (as SHIMS_* would), builds a tiny LightningModule and fits
it; every rank writes OUT/<strategy>.<case>.rank{R}.json (flags DDP was built with, the ddp receipt) and .pt (final
parameters), from a callback (spawned ranks run no code of this script after fit). Case keys: name, model ("all":
every parameter used; "extra": a layer never used), freeze, accumulate (accumulate_grad_batches), observe
(SHIMS_DDP_OBSERVE), shims (False: not enabled), knob (None: Lightning's default; "string": the strategy name
"<strategy>_find_unused_parameters_false"; false: DDPStrategy/DDPSpawnStrategy(find_unused_parameters=False)).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

warnings.filterwarnings("ignore")
STEPS = 6


class Tiny(pl.LightningModule):
    def __init__(self, uses_extra):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.extra = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        self.uses_extra = uses_extra

    def forward(self, x):
        h = self.body(x)
        return self.head(self.extra(h) if self.uses_extra else h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class Record(pl.Callback):
    """In every rank (spawned ones too): shims configured before DDP is built, the outcome written after fit."""

    def __init__(self, name, case, out):
        self.name, self.case, self.out = name, case, out

    def setup(self, trainer, pl_module, stage=None):
        torch.set_num_threads(1)  # spawned ranks run none of this script's __main__: one thread, as in the others
        with torch.no_grad():  # spawned ranks receive the parameters in shared memory (torch.multiprocessing): on
            for param in pl_module.parameters():  # the CPU both would step the same storage; give each its own copy
                param.data = param.data.clone()
        import shims
        from shims import engine
        engine.reset()
        if self.case.get("shims") is False:
            return
        shims.enable(patches=["ddp"], mode=self.case.get("mode", "fix"),
                     options={"SHIMS_DDP_OBSERVE": str(self.case.get("observe", 4))})

    def on_train_end(self, trainer, pl_module):
        import shims
        from shims.patches.ddp.observation import finish_all
        finish_all()
        ddp = trainer.strategy.model
        result = {"find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
                  "receipt": shims.status()["patches"].get("ddp")}
        stem = os.path.join(self.out, f"{self.name}.{self.case['name']}.rank{trainer.global_rank}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1, default=str)
        torch.save({k: v.detach().clone() for k, v in pl_module.named_parameters()}, stem + ".pt")


def lightning_module(case):
    torch.manual_seed(0)
    module = Tiny(case.get("model", "all") == "all")
    if case.get("freeze"):
        module.extra.requires_grad_(False)
    return module


def strategy_of(name, case):
    from pytorch_lightning.strategies import DDPSpawnStrategy, DDPStrategy
    knob = case.get("knob")
    if knob == "string":
        return f"{name}_find_unused_parameters_false"
    if knob is False:
        return (DDPStrategy if name == "ddp" else DDPSpawnStrategy)(find_unused_parameters=False)
    return name


def fit(name, case, out):
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    module = lightning_module(case)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy_of(name, case), max_steps=STEPS,
                         accumulate_grad_batches=case.get("accumulate", 1), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[Record(name, case, out)])
    trainer.fit(module, loader)  # lightning-fit


if __name__ == "__main__":
    os.environ["PL_DISABLE_FORK"] = "1"
    torch.set_num_threads(1)
    for case in json.loads(sys.argv[3]):
        fit(sys.argv[1], case, sys.argv[2])
