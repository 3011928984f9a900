"""ddp: choose DistributedDataParallel's find_unused_parameters policy before the object is built.

Target   `torch.nn.parallel.DistributedDataParallel.__init__` (torch >= 2.1, checked on 2.14.1 with gloo), so every
         alias (`torch.nn.parallel.DistributedDataParallel`, `from ... import DistributedDataParallel as DDP`) and
         every subclass calling `super().__init__` goes through it: they are one class object.
Why      YOLO-style trainers hard-code `find_unused_parameters=True` (DAMO-YOLO `build_ddp_model`, issue #153). Every
         iteration it costs a walk of the autograd graph after forward, an all-reduce of an int32[num_params] map,
         and buckets that are never rebuilt in gradient order; the flag is only needed when some parameter can get
         no gradient. Turning it off blindly is not safe: ultralytics did (v8.4.49, PR #24413) and got hangs and
         "did not receive grad" crashes (#24536, #24612), restored in v8.4.64. Flipping `ddp.find_unused_parameters`
         after construction is broken (the reducer keeps its own copy), so the choice is made before __init__ runs.
Policy   SHIMS_DDP_FIND_UNUSED = auto (default) | keep | off | static
           keep    the arguments as written
           off     find_unused_parameters=False
           static  static_graph=True (graph walked in the first iteration only; a constant unused set is fine);
                   refused, with a message, when the first backward would run inside no_sync() (pytorch#143580)
           auto    off at the known-safe call sites (SAFE_SITES below, plus SHIMS_DDP_SAFE_SITES), keep elsewhere,
                   and over the first SHIMS_DDP_OBSERVE iterations record how often parameters really were unused
                   (DDP's own logging data) so the receipt says whether the flag was needed and what it costs.
The work  `choose_find_unused_policy` (the replacement __init__): call site -> policy -> the same decision checked on
         every rank (through the process group's store, before any collective) -> the original __init__ with the
         adjusted arguments. When a policy shims chose makes an unused parameter an error, `UnusedParameterError`
         names the parameters, the policy and the variable to change. Docs: docs/patches/ddp.md.
"""

from shims.patch import Option, Patch, Skip, Target

# Call sites (module:function) where find_unused_parameters=True is known to be unnecessary, with the reason.
SAFE_SITES = {
    "damo.detectors.detector:build_ddp_model": (
        "DAMO-YOLO: the ZeroHead loss keeps every parameter in the graph (zero-weighted box/DFL terms when a batch has "
        "no positive sample), the student is the only DDP model, distillation modules stay outside it "
        "(tinyvision/DAMO-YOLO #153 asks about the warning)"),
}

# Call sites where `auto` must not turn it off, with the reason (recorded in the receipt).
UNSAFE_SITES = {
    "ultralytics.engine.trainer:BaseTrainer._setup_train": (
        "ultralytics: a batch without ground truth at some scale leaves head parameters without gradient; forcing "
        "False (v8.4.49, PR #24413) hung and crashed (#24536, #24612) and was reverted in v8.4.64"),
}

POLICIES = ("auto", "keep", "off", "static")
AS_WRITTEN = " (as written: "
DEFAULT_SAMPLE_RATE = 100  # torch's kDDPRuntimeLoggingSampleRate, restored after the observed iterations
_REDUCTION_ERROR = "Expected to have finished reduction in the prior iteration"

_WATCHES = None  # WeakKeyDictionary: DDP object -> _Watch, for the objects whose forward shims watches
_EXCHANGES = {}  # process-group name -> number of DDP constructions agreed on (the store key's sequence number)
_EXIT_HOOKED = False


class UnusedParameterError(RuntimeError):
    """Some parameters got no gradient under a find_unused_parameters policy that shims chose.

    Attributes: rank, names (the parameters), policy, variable (what to change), torch_message (DDP's own error).
    """

    def __init__(self, message, *, rank=None, names=(), policy=None, variable="SHIMS_DDP_FIND_UNUSED",
                 torch_message=""):
        super().__init__(message)
        self.rank, self.names, self.policy, self.variable = rank, tuple(names), policy, variable
        self.torch_message = torch_message


# ---------------------------------------------------------------------------------------------------- call site


class Site:
    """Who called DistributedDataParallel(...): module, function (qualified), file and line."""

    __slots__ = ("module", "function", "name", "filename", "lineno", "warning_registry")

    def __init__(self, module, function, name, filename, lineno, warning_registry=None):
        self.module, self.function, self.name, self.filename, self.lineno = module, function, name, filename, lineno
        self.warning_registry = warning_registry

    @property
    def key(self):
        return f"{self.module}:{self.function}"

    @property
    def where(self):
        return f"{self.filename}:{self.lineno}"

    def matches(self, sites):
        """The entry of `sites` (module:function) naming this site, by qualified or plain function name."""
        for candidate in (self.key, f"{self.module}:{self.name}"):
            if candidate in sites:
                return candidate
        return None


def call_site(ddp, frame):
    """The first caller frame outside DDP's own __init__ chain (subclasses calling super().__init__), torch and wrapt
    (its pure-Python wrappers add frames when its C extension is off)."""
    from shims.frames import qualname
    while frame is not None:
        code = frame.f_code
        module = frame.f_globals.get("__name__", "") or ""
        inside_init = code.co_name == "__init__" and code.co_varnames[:1] == ("self",) \
            and frame.f_locals.get("self") is ddp
        if not inside_init and not module.startswith(("torch.nn.parallel", "wrapt.")):
            if module == "__mp_main__":  # the script in a spawn child is the same site as in the parent
                module = "__main__"
            return Site(module, qualname(frame), code.co_name, code.co_filename,
                        frame.f_lineno, frame.f_globals.setdefault("__warningregistry__", {}))
        frame = frame.f_back
    return Site("?", "?", "?", "?", 0)


# ---------------------------------------------------------------------------------------------------- decision


class Decision:
    """What to build: the effective flags, why, and what to watch once built."""

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
    extra = tuple(options["SAFE_SITES"])
    listed = site.matches(SAFE_SITES)
    if listed:
        return Decision("off", False, sg, fu, sg, f"{shown}: known-safe site {listed}: {SAFE_SITES[listed]}")
    listed = site.matches(extra)
    if listed:
        return Decision("off", False, sg, fu, sg, f"{shown}: {listed} is listed in SHIMS_DDP_SAFE_SITES",
                        variable="SHIMS_DDP_SAFE_SITES")
    listed = site.matches(UNSAFE_SITES)
    why = f"known-unsafe site {listed}: {UNSAFE_SITES[listed]}" if listed else "not a known-safe site"
    return Decision("keep", fu, sg, fu, sg, f"{shown}: {why}; kept as written", observe=observe)


# ---------------------------------------------------------------------------------------------------- ranks agree


class RanksDisagree(Exception):
    """The ranks' decisions differ (or a rank never answered); `answers` maps rank -> its decision text."""

    def __init__(self, message, answers, as_written_agree):
        super().__init__(message)
        self.answers, self.as_written_agree = answers, as_written_agree


class RanksDisagreeError(RuntimeError):
    """Raised on every rank when they would build DDP with different flags: training would hang, so it stops here."""


def _group_of(bound):
    import torch.distributed as dist
    group = bound.get("process_group")
    mesh = bound.get("device_mesh")
    if group is None and mesh is not None:
        group = mesh.get_group()
    return group if group is not None else dist.group.WORLD


def agree_across_ranks(decision, bound):
    """Check that every rank of the DDP's process group took the same decision, before any collective runs.

    Goes through the default store (not a collective), so a rank without shims cannot mismatch DDP's own
    collectives; waiting is bounded by the store's timeout (the process group's). Raises RanksDisagree.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = _group_of(bound)
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) < 2:
        return None
    from torch.distributed import distributed_c10d
    store = distributed_c10d._get_default_store()
    name = getattr(group, "group_name", None) or "world"
    sequence = _EXCHANGES[name] = _EXCHANGES.get(name, 0) + 1  # DDP construction is collective: same order per rank
    prefix = f"shims/ddp/{name}/{sequence}/"
    store.set(prefix + str(dist.get_rank()), decision.wire())
    try:
        store.wait([prefix + str(r) for r in ranks])
    except Exception as exc:  # noqa: BLE001 - DistStoreError on timeout
        answered = {r: store.get(prefix + str(r)).decode() for r in ranks if store.check([prefix + str(r)])}
        missing = [r for r in ranks if r not in answered]
        # a rank without shims builds DDP as written: falling back to that is the one choice consistent with it
        raise RanksDisagree(f"rank(s) {missing} gave no find_unused_parameters decision ({type(exc).__name__}: "
                            f"{exc}); is shims running on every rank?", answered, True) from None
    answers = {r: store.get(prefix + str(r)).decode() for r in ranks}
    # no rank may leave before every rank has read: the rank hosting the store would otherwise raise and exit while
    # another still reads, which then sees "Connection reset by peer" instead of the disagreement
    try:
        store.set(prefix + "read/" + str(dist.get_rank()), "1")
        store.wait([prefix + "read/" + str(r) for r in ranks])
    except Exception:  # noqa: BLE001 - every answer is read already; a store going away now changes nothing
        pass
    if len(set(answers.values())) > 1:
        as_written = {a.rsplit(AS_WRITTEN, 1)[-1] for a in answers.values()}
        listing = "; ".join(f"rank {r}: {a}" for r, a in sorted(answers.items()))
        raise RanksDisagree(f"ranks disagree on the DistributedDataParallel find_unused_parameters policy ({listing})",
                            answers, len(as_written) == 1)
    return answers


# ---------------------------------------------------------------------------------------------------- watching


def _parameter_names(ddp):
    """Names of the parameters in the reducer's order (the order DDP's error messages index into)."""
    names, seen = [], set()
    ignored = getattr(ddp, "parameters_to_ignore", set())
    for module_name, module in ddp.module.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            if param.requires_grad and f"{module_name}.{param_name}" not in ignored and id(param) not in seen:
                seen.add(id(param))
                names.append(fqn)
    return names


def _unreduced_parameters(ddp, message):
    """(rank, names) of the parameters DDP's error says got no gradient."""
    import re
    found = re.search(r"Parameter indices which did not receive grad for rank (\d+): ([\d ]+)", message)
    if found:
        names = _parameter_names(ddp)
        indices = [int(i) for i in found.group(2).split()]
        return int(found.group(1)), [names[i] if i < len(names) else f"#{i}" for i in indices]
    found = re.search(r"Parameters which did not receive grad for rank (\d+): ([^\n]*)", message)
    if found:
        return int(found.group(1)), [n.strip() for n in found.group(2).split(",") if n.strip()]
    return None, []


class _Watch:
    """Per DDP object: what shims decided there, the first-sync guard, and the observation of unused parameters."""

    def __init__(self, ctx, site, decision, limit, torch):
        self.ctx, self.site, self.decision, self.torch = ctx, site, decision, torch
        compiler = getattr(torch, "compiler", None)
        self.compiling = getattr(compiler, "is_compiling", None) or (lambda: False)
        self.limit = limit if decision.observe else 0
        self.guard_first_sync = decision.guard_first_sync
        self.synced = 0  # forwards that prepared a synchronised backward
        self.observed = 0  # iterations whose unused set was read from DDP's logging data
        self.with_unused = 0
        self.unused_bytes = 0  # the most bytes of unused parameters in one iteration
        self.post_forward_s = []
        self.starts = []
        self.finished = not self.limit
        self.parameter_tensors = None

    @property
    def observing(self):
        return not self.finished

    def where(self):
        return f"{self.site.where} ({self.site.key})"

    def refuse_no_sync_first(self):
        return UnusedParameterError(
            f"shims ddp: static_graph=True (set by SHIMS_DDP_FIND_UNUSED=static for the DistributedDataParallel built "
            f"at {self.where()}) needs the first backward to synchronise, but the first forward runs inside "
            "no_sync() (gradient accumulation); torch fails there with an internal assert (pytorch#143580). "
            "Set SHIMS_DDP_FIND_UNUSED=keep or off, or run one synchronised step before accumulating.",
            policy="static")

    def explain(self, ddp, exc):
        message = str(exc)
        rank, names = _unreduced_parameters(ddp, message)
        d = self.decision
        shown = ", ".join(names) if names else "(DDP did not say which)"
        if d.static_graph:
            cause = (f"static_graph=True, chosen by SHIMS_DDP_FIND_UNUSED={d.policy}, needs the same parameters to get "
                     "a gradient in every iteration; these got one in an earlier iteration and none in the last one")
            fix = "Set SHIMS_DDP_FIND_UNUSED=keep (DDP as written)"
        else:
            cause = (f"find_unused_parameters=False, chosen by shims ({d.reason}), makes DDP wait for every "
                     "parameter's gradient; the gradients of that iteration were not all-reduced")
            fix = ("Remove the site from SHIMS_DDP_SAFE_SITES or set SHIMS_DDP_FIND_UNUSED=keep"
                   if d.variable == "SHIMS_DDP_SAFE_SITES" else "Set SHIMS_DDP_FIND_UNUSED=keep (DDP as written)")
        self.ctx.count("unused_parameter_errors")
        text = (f"shims ddp: on rank {rank if rank is not None else '?'}, {len(names) or 'some'} parameter(s) received "
                f"no gradient in the previous iteration: {shown}. Cause: {cause} (DistributedDataParallel built at "
                f"{self.where()}). {fix}.")
        return UnusedParameterError(text, rank=rank, names=names, policy=d.policy, variable=d.variable,
                                    torch_message=message)

    def after_pre_forward(self, ddp):
        """A synchronised forward began: DDP's logging data now describes the previous synchronised iteration."""
        self.starts.append(_clock())
        if self.synced:
            size = ddp._get_ddp_logging_data().get("unused_parameter_size")
            if size is not None:
                self.observed += 1
                self.ctx.count("iterations_observed")
                if size > 0:  # bytes of the parameters unused in that iteration (0 when every one got a gradient)
                    self.with_unused += 1
                    self.unused_bytes = max(self.unused_bytes, size)
        self.synced += 1
        if self.observed >= self.limit:
            self.finish(ddp)

    def finish(self, ddp=None):
        """Write what was observed (a note in fix mode, a finding in detect mode) and stop watching."""
        if self.finished:
            return
        self.finished = True
        if ddp is not None:
            _unwatch(ddp, self)
        if not self.observed:
            return
        iteration_s = _median([b - a for a, b in zip(self.starts, self.starts[1:])])
        walk_s = _median(self.post_forward_s[1:] or self.post_forward_s)
        params = self.parameter_tensors
        if self.with_unused:
            self.ctx.note(f"{self.where()}: parameters were unused in {self.with_unused} of {self.observed} "
                          f"iterations (up to {self.unused_bytes} bytes of parameters): find_unused_parameters=True "
                          "is needed here; kept")
            return
        if self.post_forward_s:
            cost = f"about {walk_s * 1e3:.3f} ms per iteration in the unused-parameter search after each forward"
            if iteration_s:
                cost += f" ({100 * walk_s / iteration_s:.2f}% of a {iteration_s * 1e3:.1f} ms iteration)"
        else:  # torch 2.0: the search runs inside DDP.forward, which has no separate step to time
            cost = "the unused-parameter search after each forward (not timed on this torch: it runs inside " \
                   "DistributedDataParallel.forward, which has no _post_forward before torch 2.1)"
        cost += ", plus an all-reduce of an int32" + (f"[{params}]" if params else "") + " used-parameter map"
        message = f"find_unused_parameters=True but 0 unused parameters in {self.observed} iterations"
        advice = ("SHIMS_DDP_FIND_UNUSED=static (a constant unused set is fine), or add "
                  f"{self.site.key} to SHIMS_DDP_SAFE_SITES if no batch (e.g. one without labels) can ever leave "
                  "a parameter without gradient")
        if self.ctx.mode == "detect":
            self.ctx.finding("find-unused-parameters", message, where=self.site.where, cost=cost, fix=advice)
        else:
            self.ctx.note(f"{self.where()}: {message}: SHIMS_DDP_FIND_UNUSED=static would save {cost}. "
                          f"To act on it: {advice}")


def _clock():
    import time
    return time.perf_counter()


def _median(values):
    values = sorted(values)
    if not values:
        return 0.0
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _guarded(self, step, inputs, kwargs):
    """DDP's forward step (`_pre_forward`, or the whole `forward` on torch 2.0) for a watched object: the no_sync
    guard before it, the explanation of DDP's reduction error, and the observation after it (DDP's logging data was
    updated as it began)."""
    watch = _WATCHES.get(self) if _WATCHES is not None else None
    if watch is None:
        return step(self, *inputs, **kwargs)
    grad = watch.torch.is_grad_enabled()
    if watch.guard_first_sync and grad:
        if not self.require_backward_grad_sync:
            raise watch.refuse_no_sync_first()
        watch.guard_first_sync = False
    try:
        result = step(self, *inputs, **kwargs)
    except RuntimeError as exc:
        if watch.decision.changed and _REDUCTION_ERROR in str(exc):
            raise watch.explain(self, exc) from None
        raise
    if watch.observing and grad and self.require_backward_grad_sync and not watch.compiling():
        watch.after_pre_forward(self)
    return result


def _watched_pre_forward(self, *inputs, **kwargs):
    """DDP._pre_forward for a watched object (torch 2.1+)."""
    return _guarded(self, type(self)._pre_forward, inputs, kwargs)


def _watched_post_forward(self, output):
    """DDP._post_forward for an observed object: times the unused-parameter search (what static_graph skips)."""
    post_forward = type(self)._post_forward
    watch = _WATCHES.get(self) if _WATCHES is not None else None
    if watch is None or not watch.observing or not (watch.torch.is_grad_enabled() and self.require_backward_grad_sync) \
            or watch.compiling():  # under torch.compile tracing: observe nothing, time nothing
        return post_forward(self, output)
    start = _clock()
    output = post_forward(self, output)
    watch.post_forward_s.append(_clock() - start)
    return output


def _watched_forward(self, *inputs, **kwargs):
    """torch 2.0: DDP.forward has no _pre_forward/_post_forward (2.1+): the same around the whole forward (the
    unused-parameter search then cannot be timed on its own)."""
    return _guarded(self, type(self).forward, inputs, kwargs)


def _split_forward(ddp):
    """Whether this DDP splits its forward into _pre_forward / _post_forward (torch 2.1+)."""
    return hasattr(type(ddp), "_pre_forward") and hasattr(type(ddp), "_post_forward")


def _watch(ddp, watch):
    """Install the per-object forward wrappers (instance attributes: other DDP objects are untouched)."""
    global _WATCHES, _EXIT_HOOKED
    import types
    import weakref
    if _WATCHES is None:
        _WATCHES = weakref.WeakKeyDictionary()
    _WATCHES[ddp] = watch
    watch.parameter_tensors = ddp._get_ddp_logging_data().get("num_parameter_tensors")
    if _split_forward(ddp):
        ddp.__dict__["_pre_forward"] = types.MethodType(_watched_pre_forward, ddp)
    else:
        ddp.__dict__["forward"] = types.MethodType(_watched_forward, ddp)
    if watch.observing:
        ddp._set_ddp_runtime_logging_sample_rate(1)  # DDP samples its logging data: make it describe every iteration
        if _split_forward(ddp):
            ddp.__dict__["_post_forward"] = types.MethodType(_watched_post_forward, ddp)
        if not _EXIT_HOOKED:
            import atexit
            atexit.register(_finish_all)  # after the engine's own exit hook is registered, so it runs before it
            _EXIT_HOOKED = True


def _unwatch(ddp, watch):
    """Stop observing; keep the pre-forward wrapper only while it still has a guard or an error to explain."""
    try:
        ddp._set_ddp_runtime_logging_sample_rate(DEFAULT_SAMPLE_RATE)
    except Exception:  # noqa: BLE001 - a torch without the setter: the sample rate only affects logging
        pass
    ddp.__dict__.pop("_post_forward", None)
    if not watch.decision.changed and not watch.guard_first_sync:
        ddp.__dict__.pop("_pre_forward", None)
        ddp.__dict__.pop("forward", None)
        if _WATCHES is not None:
            _WATCHES.pop(ddp, None)


def _finish_all():
    """At exit: report observations cut short (fewer iterations than SHIMS_DDP_OBSERVE)."""
    for ddp, watch in list((_WATCHES or {}).items()):
        try:
            watch.finish(ddp)
        except Exception:  # noqa: BLE001 - never fail the user's exit
            pass


def _forget_all():
    """shims.disable(): remove the wrappers from every watched object (their flags stay: DDP cannot change them)."""
    for ddp, watch in list((_WATCHES or {}).items()):
        if watch.observing:
            try:
                ddp._set_ddp_runtime_logging_sample_rate(DEFAULT_SAMPLE_RATE)
            except Exception:  # noqa: BLE001 - the sample rate only affects logging
                pass
        watch.finished = True
        watch.guard_first_sync = False
        for name in ("_pre_forward", "_post_forward", "forward"):
            ddp.__dict__.pop(name, None)
        _WATCHES.pop(ddp, None)


# ---------------------------------------------------------------------------------------------------- the patch


def _handle_disagreement(ctx, site, decision, disagreement):
    """Every rank reaches here with the same answers: all raise, or (non-strict, same arguments as written) all
    fall back to the arguments as written, so no rank is left waiting."""
    from shims.errors import ShimsPatchError
    text = (f"shims ddp: {disagreement} at the DistributedDataParallel built at {site.where} ({site.key}). Set the "
            "same SHIMS_DDP_FIND_UNUSED and SHIMS_DDP_SAFE_SITES on every rank.")
    ctx.count("rank_disagreements")
    if not disagreement.as_written_agree:
        raise RanksDisagreeError(text + " The arguments as written differ between ranks too: DDP would hang.")
    if ctx.strict:
        raise ShimsPatchError(text + " (SHIMS_STRICT=1; with SHIMS_STRICT=0 every rank builds DDP as written)")
    ctx.record.target(ctx.target, "error", text + " Every rank built DDP with the arguments as written.")
    ctx.logger().warning("%s Every rank builds DDP with the arguments as written.", text)
    fu, sg = decision.user_find_unused, decision.user_static_graph
    return Decision("keep", fu, sg, fu, sg, "ranks disagreed: arguments as written")


def _make_init(original, ctx):
    import inspect
    import sys
    import warnings
    from shims.errors import ShimsPatchError
    from shims.patch import wrap
    signature = inspect.signature(original)

    def construct_with_policy(wrapped, self, args, kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
            site = call_site(self, sys._getframe(1))
            arguments = bound.arguments
            decision = find_unused_policy(ctx.options, site, arguments.get("find_unused_parameters", False),
                                          arguments.get("static_graph", False), ctx.mode)
            if ctx.mode == "fix":
                try:
                    agree_across_ranks(decision, arguments)
                except RanksDisagree as disagreement:
                    decision = _handle_disagreement(ctx, site, decision, disagreement)
                if decision.changed:
                    arguments["find_unused_parameters"] = decision.find_unused
                    arguments["static_graph"] = decision.static_graph
        except (ShimsPatchError, RanksDisagreeError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failure of shims must not stop the user's training
            if ctx.strict:
                raise ShimsPatchError(f"shims ddp: could not decide the find_unused_parameters policy: "
                                      f"{type(exc).__name__}: {exc}") from exc
            ctx.record.target(ctx.target, "error", f"{type(exc).__name__}: {exc}; DDP built as written")
            ctx.logger().warning("shims ddp: could not decide the policy (%s: %s); DDP built as written",
                                 type(exc).__name__, exc)
            return original(self, *args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # record all; the user's filters apply when they are re-emitted below
            original(*bound.args, **bound.kwargs)
        for w in caught:  # DDP's warnings use stacklevel=2: point them at the user's line again, not at this wrapper
            warnings.warn_explicit(w.message, w.category, site.filename, site.lineno, module=site.module,
                                   registry=site.warning_registry)
        _after_construction(self, ctx, site, decision)

    return wrap(original, construct_with_policy)


def _after_construction(ddp, ctx, site, decision):
    ctx.count("constructions")
    if decision.changed:
        ctx.count("static_graph_set" if decision.static_graph else "find_unused_turned_off")
    was = f"find_unused_parameters={decision.user_find_unused}, static_graph={decision.user_static_graph}"
    now = f"find_unused_parameters={decision.find_unused}, static_graph={decision.static_graph}"
    ctx.note(f"{site.where} ({site.key}): " + (f"{was} -> {now}" if decision.changed else f"{now} kept")
             + f" ({decision.reason})")
    if not (decision.changed or decision.guard_first_sync or decision.observe):
        return
    try:
        import torch
        _watch(ddp, _Watch(ctx, site, decision, ctx.options["OBSERVE"], torch))
    except Exception as exc:  # noqa: BLE001 - watching is a convenience; the decision itself is already in place
        if ctx.strict:
            raise
        ctx.note(f"{site.where}: could not watch the forward ({type(exc).__name__}: {exc})")


def choose_find_unused_policy(original, ctx):
    """The replacement of DistributedDataParallel.__init__: the policy is chosen before the object exists."""
    ctx.on_revert(_forget_all)
    return _make_init(original, ctx)


def observe_find_unused(original, ctx):
    """Observe-only: DDP is built exactly as written; objects with find_unused_parameters=True are watched for the
    first SHIMS_DDP_OBSERVE iterations and a finding says when no parameter was ever unused."""
    ctx.on_revert(_forget_all)
    return _make_init(original, ctx)


def fingerprint(init):
    """None when DDP looks like the one this patch was written for, else why not."""
    import inspect
    try:
        parameters = inspect.signature(init).parameters
    except (TypeError, ValueError) as exc:
        return f"DistributedDataParallel.__init__ has no readable signature: {exc}"
    missing = [p for p in ("find_unused_parameters", "static_graph", "process_group") if p not in parameters]
    if missing:
        return f"DistributedDataParallel.__init__ has no parameter {', '.join(missing)}"
    owner = init.__globals__.get("DistributedDataParallel")
    needed = ("forward", "_get_ddp_logging_data", "_set_ddp_runtime_logging_sample_rate", "no_sync")
    absent = [n for n in needed if owner is None or not hasattr(owner, n)]
    if absent:
        return f"DistributedDataParallel has no {', '.join(absent)} (a torch this patch was not written for)"
    return None


PATCH = Patch(
    name="ddp",
    summary="choose DDP's find_unused_parameters policy before construction: off at known-safe sites (DAMO-YOLO), "
            "kept and measured elsewhere",
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
    upstream="tinyvision/DAMO-YOLO#153; ultralytics PR #24413, #24536, #24612; pytorch#143580",
)
