"""Observation of one DDP object: the no_sync guard, the explanation of DDP's reduction error, and, over the first
SHIMS_DDP_OBSERVE iterations, which parameters really got no gradient; then advice that is safe when followed.

Evidence per rank: the set of parameters unused in each synchronised iteration (a tensor hook per parameter marks
the ones whose gradient autograd computed; an iteration is everything up to and including a synchronised backward,
micro-batches under no_sync() included, as DDP's own used-map counts them), the forwards run inside no_sync(), and
the time of DDP's unused-parameter search (torch 2.1+). The ranks exchange their evidence through the store before
anything is advised (`advise`): zero unused on every rank -> the knob False; the same unused set in every iteration
on every rank -> those parameters by name (freeze or remove them); anything else -> the flag is needed, kept.
static_graph is never advised (pytorch#143580: no_sync first; a changing set raises).
"""

from __future__ import annotations

import json

from shims.patches.ddp import ranks as rank_agreement
from shims.patches.ddp.policy import FIXED_UPSTREAM, NEEDED

_REDUCTION_ERROR = "Expected to have finished reduction in the prior iteration"
# wrappers between DDP and the user's model whose attribute names prefix every parameter name
WRAPPER_PREFIXES = ("module.", "_forward_module.", "_original_module.", "_orig_mod.")
SHARE_TIMEOUT_S = 60  # ranks reach the end of the observation at the same synchronised iteration
EXIT_SHARE_TIMEOUT_S = 5  # at exit another rank may be gone already

_OBSERVED = None  # WeakKeyDictionary: DDP object -> Observation, for the objects whose forward shims wraps
_EXIT_HOOKED = False
_LOGGED = set()  # report keys whose advice was logged at WARNING (once per site and process)


class UnusedParameterError(RuntimeError):
    """Some parameters got no gradient under a find_unused_parameters policy that shims chose.

    Attributes: rank, names (the parameters), policy, variable (what to change), torch_message (DDP's own error).
    """

    def __init__(self, message, *, rank=None, names=(), policy=None, variable="SHIMS_DDP_FIND_UNUSED",
                 torch_message=""):
        super().__init__(message)
        self.rank, self.names, self.policy, self.variable = rank, tuple(names), policy, variable
        self.torch_message = torch_message


def user_name(name):
    """A parameter's name as the user's model names it: without the prefixes of wrappers around it."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _parameters(ddp):
    """(names, tensors) of the parameters in the reducer's order (the order DDP's error messages index into)."""
    names, tensors, seen = [], [], set()
    ignored = getattr(ddp, "parameters_to_ignore", set())
    for module_name, module in ddp.module.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            if param.requires_grad and fqn not in ignored and id(param) not in seen:
                seen.add(id(param))
                names.append(fqn)
                tensors.append(param)
    return names, tensors


def _unreduced_parameters(ddp, message):
    """(rank, names) of the parameters DDP's error says got no gradient."""
    import re
    found = re.search(r"Parameter indices which did not receive grad for rank (\d+): ([\d ]+)", message)
    if found:
        names = _parameters(ddp)[0]
        indices = [int(i) for i in found.group(2).split()]
        return int(found.group(1)), [user_name(names[i]) if i < len(names) else f"#{i}" for i in indices]
    found = re.search(r"Parameters which did not receive grad for rank (\d+): ([^\n]*)", message)
    if found:
        return int(found.group(1)), [user_name(n.strip()) for n in found.group(2).split(",") if n.strip()]
    return None, []


# ---------------------------------------------------------------------------------------------------- advice


def advise(site, evidence, ranks):
    """What the observation means, from every rank's evidence: (message, fix or None, names or ()).

    evidence: {rank: {"observed", "no_sync", "sets" (distinct unused sets, user names), "bytes"}}; ranks: the ranks
    expected. A fix is given only when every rank answered and the evidence makes it safe."""
    framework = site.framework
    observed = min((e["observed"] for e in evidence.values()), default=0)
    where = f"DistributedDataParallel built at {site.where}"
    if framework is not None:
        where = (f"DistributedDataParallel built by {framework.name} ({framework.builds}) for "
                 f"{site.reached_from}, value decided at {site.decided_at or site.where}")
    no_sync = sum(e["no_sync"] for e in evidence.values())
    seen = (f" ({no_sync} forwards inside no_sync(): gradient accumulation)" if no_sync else "")
    missing = [r for r in ranks if r not in evidence]
    all_sets = {tuple(s) for e in evidence.values() for s in e["sets"]}
    per_rank = "; ".join(f"rank {r}: " + (", ".join(e["sets"][0]) if len(e["sets"]) == 1 and e["sets"][0]
                                           else "none" if e["sets"] == [[]] or not e["sets"] else "changing")
                         for r, e in sorted(evidence.items()))
    if missing:
        return (f"{where}: find_unused_parameters=True; rank(s) {missing} shared no observation, so nothing is "
                f"advised (this rank: {per_rank}){seen}", None, ())
    if framework is not None and framework.verdict == NEEDED:
        return (f"{where}: find_unused_parameters=True is needed here ({framework.reason}); {observed} iterations "
                f"observed ({per_rank}); kept", None, ())
    if len(all_sets) > 1:
        return (f"{where}: the set of unused parameters changed between iterations or ranks over {observed} "
                f"iterations ({per_rank}): find_unused_parameters=True is needed here; kept{seen}", None, ())
    unused = next(iter(all_sets), ())
    knob = framework.knob if framework is not None else \
        f"DistributedDataParallel(..., find_unused_parameters=False) at {site.where}"
    caveat = " if no batch (e.g. one without labels) can leave a parameter without gradient"
    if framework is not None and framework.verdict == FIXED_UPSTREAM:
        caveat += " (this framework's default is already False: True was asked for in your code)"
    if not unused:
        message = (f"{where}: find_unused_parameters=True but 0 unused parameters in {observed} iterations on every "
                   f"rank ({len(evidence)} ranks){seen}")
        return message, f"{knob}{caveat}", ()
    nbytes = max(e["bytes"] for e in evidence.values())
    message = (f"{where}: the same {len(unused)} parameter(s) got no gradient in every one of {observed} iterations "
               f"on every rank ({len(evidence)} ranks): {', '.join(unused)} ({nbytes} bytes){seen}")
    fix = (f"freeze them (`.requires_grad_(False)` on {', '.join(unused)}) or remove them from the model; "
           f"then no parameter is unused and {knob}{caveat}")
    return message, fix, unused


# ---------------------------------------------------------------------------------------------------- observation


class Observation:
    """Per DDP object: what shims decided there, the first-sync guard, and the evidence of unused parameters."""

    def __init__(self, ctx, site, decision, limit, torch, peers=None):
        self.ctx, self.site, self.decision, self.torch, self.peers = ctx, site, decision, torch, peers
        compiler = getattr(torch, "compiler", None)
        self.compiling = getattr(compiler, "is_compiling", None) or (lambda: False)
        self.limit = limit if decision.observe else 0
        self.guard_first_sync = decision.guard_first_sync
        self.observed = 0  # synchronised iterations whose unused set was recorded
        self.no_sync = 0  # forwards with grad on inside no_sync()
        self.sets = []  # distinct unused sets (tuples of indices), in the order first seen
        self.unused_bytes = 0
        self.post_forward_s = []
        self.starts = []
        self.finished = not self.limit
        self.names, self.tensors, self.hooks = [], [], []
        self.used = set()  # indices of the parameters that got a gradient in the open iteration
        self.open = False  # an iteration is open: some forward ran since the last one closed
        self.synced_last = False  # the last forward was a synchronised one (its backward ends the iteration)

    @property
    def observing(self):
        return not self.finished

    def where(self):
        return f"{self.site.where} ({self.site.key})"

    def start(self, ddp):
        self.names, self.tensors = _parameters(ddp)
        used = self.used
        for index, tensor in enumerate(self.tensors):
            self.hooks.append(tensor.register_hook(lambda grad, index=index: used.add(index)))

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

    def forward_began(self, ddp, synced):
        """A forward with grad on began: close the iteration the last synchronised backward ended."""
        if self.synced_last:
            self.close_iteration()
            if self.observed >= self.limit:
                self.finish(ddp)
                return
        self.open = True
        self.synced_last = synced
        if synced:
            self.starts.append(_clock())
        else:
            self.no_sync += 1

    def close_iteration(self):
        unused = tuple(i for i in range(len(self.tensors)) if i not in self.used)
        self.used.clear()
        self.open = self.synced_last = False
        self.observed += 1
        self.ctx.count("iterations_observed")
        if unused not in self.sets:
            self.sets.append(unused)
        nbytes = sum(self.tensors[i].numel() * self.tensors[i].element_size() for i in unused)
        self.unused_bytes = max(self.unused_bytes, nbytes)
        if self.peers is not None:
            try:
                self.peers.publish(json.dumps(self.evidence()))
            except Exception:  # noqa: BLE001 - only what a rank finishing alone could read is lost
                pass

    def evidence(self):
        return {"observed": self.observed, "no_sync": self.no_sync, "bytes": self.unused_bytes,
                "sets": [[user_name(self.names[i]) for i in s] for s in self.sets]}

    def stop(self, ddp=None):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        if ddp is not None:
            _stop_observing(ddp, self)

    def finish(self, ddp=None, at_exit=False):
        """Share the evidence with the other ranks, then write what it means (a finding in detect mode, a note in
        fix mode, logged once at WARNING on rank 0 when there is something to do) and stop observing."""
        if self.finished:
            return
        self.finished = True
        if at_exit and self.synced_last:
            self.close_iteration()  # the last synchronised backward ran before exit
        self.stop(ddp)
        if not self.observed:
            return
        mine = self.evidence()
        rank = getattr(self.peers, "rank", 0)
        if self.peers is not None:
            try:
                answers = self.peers.share(json.dumps(mine), EXIT_SHARE_TIMEOUT_S if at_exit else SHARE_TIMEOUT_S)
                evidence = {r: json.loads(text) for r, text in answers.items()}
            except Exception:  # noqa: BLE001 - the store is gone (process group destroyed, its host exited)
                evidence = {}
            expected = list(self.peers.ranks)
        else:
            evidence, expected = {0: mine}, [0]
        evidence.setdefault(rank, mine)
        message, fix, names = advise(self.site, evidence, expected)
        cost = self.cost()
        if self.ctx.mode == "detect":
            kind = "unused-parameters" if names else "find-unused-parameters"
            entry = self.ctx.finding(kind, message, where=self.site.user_where or self.site.where, cost=cost,
                                     fix=fix)
            if isinstance(entry, dict):  # what a merge across ranks groups on, and the facts behind the text
                entry.update(site=self.site.report_key, built_at=self.site.where, decided_at=self.site.decided_at,
                             knob=getattr(self.site.framework, "knob", None), parameters=list(names),
                             ranks={str(r): e for r, e in sorted(evidence.items())})
            return
        text = f"{message}: the search costs {cost}." + (f" To act on it: {fix}" if fix else "")
        self.ctx.note(text)
        if fix and rank_agreement.is_first_rank() and self.site.report_key not in _LOGGED:
            _LOGGED.add(self.site.report_key)
            self.ctx.logger().warning("shims ddp: %s", text)

    def cost(self):
        iteration_s = _median([b - a for a, b in zip(self.starts, self.starts[1:])])
        walk_s = _median(self.post_forward_s[1:] or self.post_forward_s)
        if self.post_forward_s:
            cost = f"about {walk_s * 1e3:.3f} ms per iteration in the unused-parameter search after each forward"
            if iteration_s:
                cost += f" ({100 * walk_s / iteration_s:.2f}% of a {iteration_s * 1e3:.1f} ms iteration)"
        else:  # torch 2.0: the search runs inside DDP.forward, which has no separate step to time
            cost = "the unused-parameter search after each forward (not timed on this torch: it runs inside " \
                   "DistributedDataParallel.forward, which has no _post_forward before torch 2.1)"
        return cost + f", plus an all-reduce of an int32[{len(self.tensors)}] used-parameter map"


def _clock():
    import time
    return time.perf_counter()


def _median(values):
    values = sorted(values)
    if not values:
        return 0.0
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


# ---------------------------------------------------------------------------------------------------- wrappers


def _guarded(self, step, inputs, kwargs):
    """DDP's forward step (`_pre_forward`, or the whole `forward` on torch 2.0) for an observed object: the no_sync
    guard before it, the explanation of DDP's reduction error, and the start of an iteration."""
    seen = _OBSERVED.get(self) if _OBSERVED is not None else None
    if seen is None:
        return step(self, *inputs, **kwargs)
    grad = seen.torch.is_grad_enabled()
    if seen.guard_first_sync and grad:
        if not self.require_backward_grad_sync:
            raise seen.refuse_no_sync_first()
        seen.guard_first_sync = False
    if seen.observing and grad and not seen.compiling():
        seen.forward_began(self, bool(self.require_backward_grad_sync))
    try:
        return step(self, *inputs, **kwargs)
    except RuntimeError as exc:
        if seen.decision.changed and _REDUCTION_ERROR in str(exc):
            raise seen.explain(self, exc) from None
        raise


def _observed_pre_forward(self, *inputs, **kwargs):
    """DDP._pre_forward for an observed object (torch 2.1+)."""
    return _guarded(self, type(self)._pre_forward, inputs, kwargs)


def _observed_post_forward(self, output):
    """DDP._post_forward for an observed object: times the unused-parameter search (what find_unused=False skips)."""
    post_forward = type(self)._post_forward
    seen = _OBSERVED.get(self) if _OBSERVED is not None else None
    if seen is None or not seen.observing or not (seen.torch.is_grad_enabled() and self.require_backward_grad_sync) \
            or seen.compiling():  # under torch.compile tracing: observe nothing, time nothing
        return post_forward(self, output)
    start = _clock()
    output = post_forward(self, output)
    seen.post_forward_s.append(_clock() - start)
    return output


def _observed_forward(self, *inputs, **kwargs):
    """torch 2.0: DDP.forward has no _pre_forward/_post_forward (2.1+): the same around the whole forward (the
    unused-parameter search then cannot be timed on its own)."""
    return _guarded(self, type(self).forward, inputs, kwargs)


def _split_forward(ddp):
    """Whether this DDP splits its forward into _pre_forward / _post_forward (torch 2.1+)."""
    return hasattr(type(ddp), "_pre_forward") and hasattr(type(ddp), "_post_forward")


def observe(ddp, observation):
    """Install the per-object forward wrappers (instance attributes: other DDP objects are untouched)."""
    global _OBSERVED, _EXIT_HOOKED
    import types
    import weakref
    if _OBSERVED is None:
        _OBSERVED = weakref.WeakKeyDictionary()
    _OBSERVED[ddp] = observation
    if _split_forward(ddp):
        ddp.__dict__["_pre_forward"] = types.MethodType(_observed_pre_forward, ddp)
    else:
        ddp.__dict__["forward"] = types.MethodType(_observed_forward, ddp)
    if observation.observing:
        observation.start(ddp)
        if _split_forward(ddp):
            ddp.__dict__["_post_forward"] = types.MethodType(_observed_post_forward, ddp)
        if not _EXIT_HOOKED:
            import atexit
            atexit.register(finish_all)  # after the engine's own exit hook is registered, so it runs before it
            _EXIT_HOOKED = True


def _stop_observing(ddp, observation):
    """Stop observing; keep the pre-forward wrapper only while it still has a guard or an error to explain."""
    ddp.__dict__.pop("_post_forward", None)
    if not observation.decision.changed and not observation.guard_first_sync:
        ddp.__dict__.pop("_pre_forward", None)
        ddp.__dict__.pop("forward", None)
        if _OBSERVED is not None:
            _OBSERVED.pop(ddp, None)


def finish_all():
    """At exit: report observations cut short (fewer iterations than SHIMS_DDP_OBSERVE)."""
    for ddp, observation in list((_OBSERVED or {}).items()):
        try:
            observation.finish(ddp, at_exit=True)
        except Exception:  # noqa: BLE001 - never fail the user's exit
            pass


def forget_all():
    """shims.disable(): remove the wrappers from every observed object (their flags stay: DDP cannot change them)."""
    for ddp, observation in list((_OBSERVED or {}).items()):
        observation.finished = True
        observation.guard_first_sync = False
        observation.stop()
        for name in ("_pre_forward", "_post_forward", "forward"):
            ddp.__dict__.pop(name, None)
        _OBSERVED.pop(ddp, None)
