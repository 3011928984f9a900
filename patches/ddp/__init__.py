"""ddp: choose DistributedDataParallel's find_unused_parameters policy before the object is built, and advise on it
where frameworks build DDP for the user.

Target   `torch.nn.parallel.DistributedDataParallel.__init__` (torch >= 2.0, checked on 2.0.1 and 2.14.1 with gloo), so
         every alias and every subclass calling `super().__init__` goes through it: they are one class object.
Why      YOLO-style trainers hard-code `find_unused_parameters=True` (DAMO-YOLO `build_ddp_model`,
         tinyvision/DAMO-YOLO#153), and so do the frameworks most DDP users train with: the transformers Trainer for
         any model without gradient checkpointing (transformers issue #9802), Lightning 1.x's DDP strategies (default False only from 2.0, PR #16611). Every
         iteration it costs a walk of the autograd graph after forward, an all-reduce of an int32[num_params] map,
         and buckets that are never rebuilt in gradient order; the flag is only needed when some parameter can get
         no gradient. Turning it off blindly is not safe: ultralytics did (v8.4.49, PR #24413) and got hangs and
         crashes (#24536, #24612). Flipping `ddp.find_unused_parameters` after construction is broken (the reducer
         keeps its own copy), so the choice is made before __init__ runs.
Policy   SHIMS_DDP_FIND_UNUSED = auto (default) | keep | off | static
           keep    the arguments as written
           off     find_unused_parameters=False
           static  static_graph=True; refused, with a message, when the first backward would run inside no_sync()
           auto    off at known-safe sites (policy.FRAMEWORK_SITES with verdict "safe", plus SHIMS_DDP_SAFE_SITES),
                   kept elsewhere (never switched at a framework's shared construction: models vary), and over the
                   first SHIMS_DDP_OBSERVE iterations observed: advice names the user's line, the framework line
                   that decided the value and the knob to set, only when every rank's evidence makes it safe.
Parts    policy.py       call sites, the framework site table, the decision (pure)
         ranks.py        every rank agrees on the decision; evidence shared before advice (through the store)
         observation.py  the no_sync guard, DDP's reduction error explained, unused parameters observed, advice
         patch.py        the replacement __init__ and the fingerprint
         frames.py       qualified function names on Python 3.9/3.10 (no co_qualname)
Docs: docs/patches/ddp.md.
"""

from shims.patch import Option, Patch, Target
from shims.patches.ddp.observation import UnusedParameterError, advise, user_name
from shims.patches.ddp.patch import choose_find_unused_policy, fingerprint, observe_find_unused
from shims.patches.ddp.policy import (FRAMEWORK_SITES, POLICIES, SAFE_SITES, UNSAFE_SITES, Decision, Site, call_site,
                                      find_unused_policy)
from shims.patches.ddp.ranks import RanksDisagree, RanksDisagreeError, agree_across_ranks

__all__ = ["PATCH", "FRAMEWORK_SITES", "SAFE_SITES", "UNSAFE_SITES", "POLICIES", "Decision", "Site", "call_site",
           "find_unused_policy", "advise", "user_name", "agree_across_ranks", "RanksDisagree", "RanksDisagreeError",
           "UnusedParameterError", "choose_find_unused_policy", "observe_find_unused", "fingerprint"]

PATCH = Patch(
    name="ddp",
    summary="choose DDP's find_unused_parameters policy before construction: off at known-safe sites (DAMO-YOLO), "
            "kept, observed and advised on elsewhere (Trainer, accelerate, Lightning 1.x)",
    targets=(Target("torch.nn.parallel.distributed", "DistributedDataParallel.__init__"),),
    replace=choose_find_unused_policy,
    detect=observe_find_unused,
    fingerprint=fingerprint,
    distribution="torch",
    # torch 2.0 has everything this needs: the constructor arguments, static_graph and DDP's logging data
    supported=">=2.0",
    options=(
        Option("FIND_UNUSED", "choice", default="auto", choices=POLICIES,
               help="auto: off at known-safe call sites, kept and measured elsewhere; keep: as written; "
                    "off: find_unused_parameters=False; static: static_graph=True"),
        Option("SAFE_SITES", "sites", default=(),
               help="more call sites (module:function) where auto may turn find_unused_parameters off"),
        Option("OBSERVE", "int", default=50,
               help="iterations over which auto and detect mode record unused parameters (0: do not observe)"),
    ),
    docs="docs/patches/ddp.md",
    upstream="tinyvision/DAMO-YOLO#153; transformers#9802; Lightning PR #16611; ultralytics PR #24413, #24536, "
             "#24612; pytorch#143580",
)
