"""Where DistributedDataParallel is built, and what to build there: call sites, framework sites, the decision.

`call_site` finds who called DistributedDataParallel(...); `framework_site` finds which framework built it (the
FRAMEWORK_SITES table: who builds DDP, the user-facing knob, the framework line that decides the value, the
versions, and the verdict) and the user's line that reached the framework; `find_unused_policy` decides the flags
(pure: no torch, no side effect).
"""

from __future__ import annotations

POLICIES = ("auto", "keep", "off", "static")
AS_WRITTEN = " (as written: "

# Verdicts of a framework site. Only SAFE is ever switched automatically; the others are never advised off blindly.
SAFE = "safe"  # the flag is never needed there: auto turns it off
NEEDED = "needed"  # some batches really leave parameters unused: never advised off
MODEL_DEPENDENT = "model-dependent"  # a framework default for every model: advice only from what was observed
FIXED_UPSTREAM = "fixed-upstream"  # the framework's default is False now: True there was asked for by the user


class FrameworkSite:
    """One framework's DDP construction, as data.

    name      short name (the site key's first part)
    marks     module-name prefixes: one of them on the construction stack identifies the site (most specific first)
    builds    module:function that calls DistributedDataParallel(...)
    decides   (module, qualified function, [text on the line for each way the value is decided]): where the framework
              decides find_unused_parameters; the line is found in the installed source (versions differ)
    knob      what the user writes to set the flag False
    entry     the user's call that reaches the framework
    versions  where this was read
    verdict   SAFE | NEEDED | MODEL_DEPENDENT | FIXED_UPSTREAM
    reason    why, with the upstream issue or PR
    fixed_as  the entry to use instead where the deciding line is not in the installed source (pytorch-lightning 2.x
              keeps the module names of 1.x without the True default)
    """

    __slots__ = ("name", "marks", "builds", "decides", "knob", "entry", "versions", "verdict", "reason", "fixed_as")

    def __init__(self, name, *, marks, builds, decides=(), knob, entry, versions, verdict, reason, fixed_as=None):
        self.name, self.marks, self.builds, self.decides, self.knob = name, marks, builds, decides, knob
        self.entry, self.versions, self.verdict, self.reason = entry, versions, verdict, reason
        self.fixed_as = fixed_as  # the site this one is where its deciding line is gone (a release that fixed it)

    @property
    def automatic(self):
        """Whether `auto` may switch the flag off here without evidence."""
        return self.verdict == SAFE


_TRAINER_BRANCHES = ("= self.args.ddp_find_unused_parameters", "not model.is_gradient_checkpointing",
                     '["find_unused_parameters"] = True')
_LIGHTNING_DECIDES = ('"find_unused_parameters", True',)

# Searched in this order: the frameworks that drive others first (RF-DETR may train through Lightning, and its
# verdict is the one that holds), then the most specific (a Trainer builds DDP through accelerate).
FRAMEWORK_SITES = (
    FrameworkSite(
        "damo-yolo", marks=("damo.detectors.detector",), builds="damo.detectors.detector:build_ddp_model",
        knob="find_unused_parameters=False in damo/detectors/detector.py build_ddp_model",
        entry="trainer.train(local_rank)", versions="DAMO-YOLO (not on PyPI; master)", verdict=SAFE,
        reason="DAMO-YOLO: the ZeroHead loss keeps every parameter in the graph (zero-weighted box/DFL terms when a "
               "batch has no positive sample), the student is the only DDP model, distillation modules stay outside "
               "it (tinyvision/DAMO-YOLO #153 asks about the warning)"),
    FrameworkSite(
        "ultralytics", marks=("ultralytics.engine.trainer",),
        builds="ultralytics.engine.trainer:BaseTrainer._setup_train", knob="(none: keep find_unused_parameters=True)",
        entry="model.train(...)", versions="ultralytics 8.3.0-8.4.0 and >= 8.4.64 (8.4.190 trainer.py:443-448)",
        verdict=NEEDED,
        reason="ultralytics: a batch without ground truth at some scale leaves head parameters without gradient; "
               "forcing False (v8.4.49, PR #24413) hung and crashed (#24536, #24612) and was reverted (PR #24620)"),
    FrameworkSite(
        "rf-detr", marks=("rfdetr",), builds="rfdetr.main:Model.train", knob="(none: keep find_unused_parameters=True)",
        entry="model.train(...)", versions="rfdetr 1.1.0-1.5.x (main.py)", verdict=NEEDED,
        reason="RF-DETR: two-stage group-DETR leaves parameters unused on purpose (rf-detr issue #1093, PR #1094)"),
    FrameworkSite(
        "transformers-trainer", marks=("transformers.trainer",),
        builds="accelerate.accelerator:Accelerator.prepare_model",
        # 5.x decides in _build_accelerator_args (5.18.0 trainer.py:737-746), 4.x in _wrap_model (4.57.6 :2194-2201)
        decides=(("transformers.trainer", "Trainer._build_accelerator_args", _TRAINER_BRANCHES),
                 ("transformers.trainer", "Trainer._wrap_model", _TRAINER_BRANCHES)),
        knob="TrainingArguments(ddp_find_unused_parameters=False)", entry="trainer.train()",
        versions="transformers 4.x (4.57.6 trainer.py:2194-2201) and 5.x (_build_accelerator_args)",
        verdict=MODEL_DEPENDENT,
        reason="True for any model that is not a PreTrainedModel with gradient checkpointing, whatever the model; "
               "never changed upstream (PR #9820 only added the opt-out; issue #9802)"),
    FrameworkSite(
        "accelerate", marks=("accelerate.accelerator",),
        builds="accelerate.accelerator:Accelerator.prepare_model",
        decides=(("accelerate.accelerator", "Accelerator.prepare_model", ("ddp_handler.to_kwargs()",)),),
        knob="DistributedDataParallelKwargs(find_unused_parameters=False) in Accelerator(kwargs_handlers=[...])",
        entry="accelerator.prepare(...)", versions="accelerate 1.x (1.16.0 accelerator.py:2031-2032)",
        verdict=MODEL_DEPENDENT,
        reason="accelerate's default is False: True comes from the DistributedDataParallelKwargs passed to it; one "
               "place builds every accelerate and Trainer model"),
    FrameworkSite(
        "lightning-ddp-spawn", marks=("pytorch_lightning.strategies.ddp_spawn",),
        builds="pytorch_lightning.strategies.ddp_spawn:DDPSpawnStrategy._setup_model",
        decides=(("pytorch_lightning.strategies.ddp_spawn", "DDPSpawnStrategy.pre_configure_ddp",
                  _LIGHTNING_DECIDES),),
        knob='Trainer(strategy=DDPSpawnStrategy(find_unused_parameters=False)) or '
             'Trainer(strategy="ddp_spawn_find_unused_parameters_false")',
        entry="trainer.fit(...)", versions="pytorch-lightning 1.x (1.9.5 strategies/ddp_spawn.py:193-197); "
                                           "2.0 removed the default (PR #16611)",
        verdict=MODEL_DEPENDENT, reason="Lightning 1.x defaults the flag to True for every model",
        fixed_as="lightning-2"),
    FrameworkSite(
        "lightning-ddp", marks=("pytorch_lightning.strategies.ddp",),
        builds="pytorch_lightning.strategies.ddp:DDPStrategy._setup_model",
        decides=(("pytorch_lightning.strategies.ddp", "DDPStrategy.pre_configure_ddp", _LIGHTNING_DECIDES),),
        knob='Trainer(strategy=DDPStrategy(find_unused_parameters=False)) or '
             'Trainer(strategy="ddp_find_unused_parameters_false")',
        entry="trainer.fit(...)", versions="pytorch-lightning 1.x (1.6.0 strategies/ddp.py:208-212, 1.9.5 "
                                           ":216-220); 2.0 removed the default (PR #16611)",
        verdict=MODEL_DEPENDENT, reason="Lightning 1.x defaults the flag to True for every model",
        fixed_as="lightning-2"),
    FrameworkSite(
        "lightning-2", marks=("lightning.pytorch.strategies", "lightning.fabric.strategies",
                              "lightning_fabric.strategies"),  # and pytorch_lightning 2.x, through fixed_as
        builds="lightning.pytorch.strategies.ddp:DDPStrategy._setup_model",
        knob="Trainer(strategy=DDPStrategy(find_unused_parameters=False))", entry="trainer.fit(...)",
        versions="lightning >= 2.0 (PR #16611)", verdict=FIXED_UPSTREAM,
        reason="Lightning 2.x defaults to False: True here was asked for in the strategy"),
)

# module:function keys of the sites auto may switch off (the DAMO-YOLO builder), and of those it must not
SAFE_SITES = {s.builds: s.reason for s in FRAMEWORK_SITES if s.verdict == SAFE}
UNSAFE_SITES = {s.builds: s.reason for s in FRAMEWORK_SITES if s.verdict == NEEDED}

# Packages whose frames are never "the user's line": frameworks, torch, shims and the machinery between them
_NOT_USER = ("torch.", "torch", "wrapt", "shims", "transformers", "accelerate", "pytorch_lightning", "lightning",
             "lightning_fabric", "damo", "ultralytics", "rfdetr", "multiprocessing", "runpy", "importlib", "threading",
             "concurrent", "contextlib", "functools")


# ---------------------------------------------------------------------------------------------------- call site


class Site:
    """Who called DistributedDataParallel(...): module, function (qualified), file and line; and, where a framework
    built it, the FrameworkSite, the user's line that reached the framework and the line that decided the value."""

    __slots__ = ("module", "function", "name", "filename", "lineno", "warning_registry", "framework", "user_where",
                 "decided_at")

    def __init__(self, module, function, name, filename, lineno, warning_registry=None):
        self.module, self.function, self.name, self.filename, self.lineno = module, function, name, filename, lineno
        self.warning_registry = warning_registry
        self.framework = self.user_where = self.decided_at = None

    @property
    def key(self):
        return f"{self.module}:{self.function}"

    @property
    def where(self):
        return f"{self.filename}:{self.lineno}"

    @property
    def reached_from(self):
        """The user's call that reached the framework, and where ("trainer.fit(...) at train.py:12")."""
        entry = self.framework.entry if self.framework is not None else "DistributedDataParallel(...)"
        if self.user_where:
            return f"{entry} at {self.user_where}"
        return f"{entry} (called in the process that started this rank: no user code on this stack)"

    @property
    def report_key(self):
        """Stable across ranks and runs: what built DDP and the user's line that led there (findings merge on it)."""
        return f"ddp:{self.framework.name if self.framework else self.key}@{self.user_where or self.where}"

    def matches(self, sites):
        """The entry of `sites` (module:function) naming this site, by qualified or plain function name."""
        for candidate in (self.key, f"{self.module}:{self.name}"):
            if candidate in sites:
                return candidate
        return None


def _module_of(frame):
    module = frame.f_globals.get("__name__", "") or ""
    return "__main__" if module == "__mp_main__" else module  # the script in a spawn child is the same site


def call_site(ddp, frame):
    """The first caller frame outside DDP's own __init__ chain (subclasses calling super().__init__), torch and wrapt
    (its pure-Python wrappers add frames when its C extension is off), with the framework site it belongs to."""
    from shims.patches.ddp.frames import qualname
    while frame is not None:
        code = frame.f_code
        module = _module_of(frame)
        inside_init = code.co_name == "__init__" and code.co_varnames[:1] == ("self",) \
            and frame.f_locals.get("self") is ddp
        if not inside_init and not module.startswith(("torch.nn.parallel", "wrapt.")):
            site = Site(module, qualname(frame), code.co_name, code.co_filename,
                        frame.f_lineno, frame.f_globals.setdefault("__warningregistry__", {}))
            framework_site(site, frame)
            return site
        frame = frame.f_back
    return Site("?", "?", "?", "?", 0)


def _is_user_module(module):
    return not any(module == p or module.startswith(p + ".") for p in _NOT_USER)


def framework_site(site, frame):
    """Fill site.framework (the FrameworkSite on the stack), site.user_where (the first user frame above the
    framework's frames: the user's line that reached the framework) and site.decided_at (the framework line that
    decided the value)."""
    modules = []
    while frame is not None:
        modules.append((_module_of(frame), frame))
        frame = frame.f_back
    for candidate in FRAMEWORK_SITES:
        hits = [f for m, f in modules if any(m == p or m.startswith(p + ".") for p in candidate.marks)]
        if hits:
            site.framework = candidate
            # the user's line: the first frame above the framework's that belongs to neither a framework nor torch
            depth = next(i for i, (m, f) in enumerate(modules) if f is hits[-1])
            user = next((f for m, f in modules[depth + 1:]
                         if _is_user_module(m) and not f.f_code.co_filename.startswith("<")), None)
            if user is not None:
                site.user_where = f"{user.f_code.co_filename}:{user.f_lineno}"
            site.decided_at = _deciding_line(candidate, [f for m, f in modules])
            if site.decided_at is None and candidate.fixed_as:
                site.framework = next(s for s in FRAMEWORK_SITES if s.name == candidate.fixed_as)
            return site
    return site


def _deciding_line(framework, frames):
    """file:line of the framework line that decided find_unused_parameters, read from the installed source."""
    import inspect
    import sys
    for module_name, function, texts in framework.decides:
        owner = sys.modules.get(module_name)
        function_object = owner
        for part in function.split("."):
            function_object = getattr(function_object, part, None)
        code = getattr(function_object, "__code__", None)
        if code is None:
            continue
        try:
            lines, first = inspect.getsourcelines(function_object)
        except (OSError, TypeError):
            continue
        branch = _branch_taken(framework, frames)
        wanted = texts[branch] if branch < len(texts) else texts[0]
        for offset, line in enumerate(lines):
            if wanted in line:
                return f"{code.co_filename}:{first + offset}"
    return None


def _branch_taken(framework, frames):
    """Which of a Trainer's three ways decided the value: the user's argument, a PreTrainedModel, any other model."""
    if framework.name != "transformers-trainer":
        return 0
    for frame in frames:
        trainer = frame.f_locals.get("self")
        args = getattr(trainer, "args", None)
        if args is not None and hasattr(args, "ddp_find_unused_parameters"):
            if args.ddp_find_unused_parameters is not None:
                return 0
            model = getattr(trainer, "model", None)
            pretrained = [c for c in type(model).__mro__ if c.__name__ == "PreTrainedModel"]
            return 1 if pretrained else 2
    return 0


# ---------------------------------------------------------------------------------------------------- decision


class Decision:
    """What to build: the effective flags, why, and what to observe once built."""

    __slots__ = ("policy", "find_unused", "static_graph", "user_find_unused", "user_static_graph", "reason",
                 "observe", "changed", "guard_first_sync", "variable")

    def __init__(self, policy, find_unused, static_graph, user_find_unused, user_static_graph, reason, *,
                 observe=False, variable="SHIMS_DDP_FIND_UNUSED"):
        self.policy, self.reason, self.observe, self.variable = policy, reason, observe, variable
        self.find_unused, self.static_graph = bool(find_unused), bool(static_graph)
        self.user_find_unused, self.user_static_graph = bool(user_find_unused), bool(user_static_graph)
        # errors and the no_sync guard are ours to explain only where shims changed what the user wrote
        self.changed = (self.find_unused, self.static_graph) != (self.user_find_unused, self.user_static_graph)
        self.guard_first_sync = self.static_graph and not self.user_static_graph

    def wire(self):
        """The decision as text, compared across ranks (the part after AS_WRITTEN: the user's own arguments)."""
        return (f"policy {self.policy}: find_unused_parameters={self.find_unused}, static_graph={self.static_graph}"
                f"{AS_WRITTEN}find_unused_parameters={self.user_find_unused}, static_graph={self.user_static_graph})")


def find_unused_policy(options, site, user_find_unused, user_static_graph, mode="fix"):
    """Decide the flags for one construction (pure: no torch, no side effect)."""
    policy = options["FIND_UNUSED"]
    observe = options["OBSERVE"] > 0
    shown = f"SHIMS_DDP_FIND_UNUSED={policy}"
    fu, sg = bool(user_find_unused), bool(user_static_graph)
    if mode == "detect":
        return Decision("keep", fu, sg, fu, sg, "observe-only mode", observe=observe and fu and not sg)
    if policy == "keep":
        return Decision("keep", fu, sg, fu, sg, shown)
    if policy == "off":
        return Decision("off", False, sg, fu, sg, shown)
    if policy == "static":
        return Decision("static", False, True, fu, sg, shown)
    if not fu:
        return Decision("keep", fu, sg, fu, sg, f"{shown}: find_unused_parameters is already False")
    if sg:
        return Decision("keep", fu, sg, fu, sg, f"{shown}: static_graph=True already walks the graph once")
    framework = getattr(site, "framework", None)
    listed = site.matches(SAFE_SITES)
    if listed or (framework is not None and framework.automatic):
        name = listed or framework.builds
        return Decision("off", False, sg, fu, sg, f"{shown}: known-safe site {name}: {SAFE_SITES.get(name, '')}")
    listed = site.matches(tuple(options["SAFE_SITES"]))
    if listed:
        return Decision("off", False, sg, fu, sg, f"{shown}: {listed} is listed in SHIMS_DDP_SAFE_SITES",
                        variable="SHIMS_DDP_SAFE_SITES")
    if framework is not None:
        why = {NEEDED: "known-unsafe site", MODEL_DEPENDENT: "framework default for every model (never switched "
               "automatically: models vary)", FIXED_UPSTREAM: "asked for in the user's code"}.get(framework.verdict)
        why = f"{why} {framework.name}: {framework.reason}"
    else:
        listed = site.matches(UNSAFE_SITES)
        why = f"known-unsafe site {listed}: {UNSAFE_SITES[listed]}" if listed else "not a known-safe site"
    return Decision("keep", fu, sg, fu, sg, f"{shown}: {why}; kept as written", observe=observe)
