"""The patch: DistributedDataParallel.__init__ replaced by one that decides the flags first (policy), checks the
decision on every rank (ranks), builds DDP with it, and observes the object where there is something to learn or to
guard (observation). Reports go through the patch context (ctx), never into the receipt directly.
"""

from __future__ import annotations

from shims.patches.ddp.observation import Observation, forget_all, observe
from shims.patches.ddp.policy import Decision, call_site, find_unused_policy
from shims.patches.ddp.ranks import RanksDisagree, RanksDisagreeError, agree_across_ranks, peers_of


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
    ctx.error(text + " Every rank built DDP with the arguments as written.")
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
            peers = peers_of(arguments)  # on every rank, at every construction: the store keys stay in step
        except (ShimsPatchError, RanksDisagreeError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failure of shims must not stop the user's training
            if ctx.strict:
                raise ShimsPatchError(f"shims ddp: could not decide the find_unused_parameters policy: "
                                      f"{type(exc).__name__}: {exc}") from exc
            ctx.error(f"{type(exc).__name__}: {exc}; DDP built as written")
            ctx.logger().warning("shims ddp: could not decide the policy (%s: %s); DDP built as written",
                                 type(exc).__name__, exc)
            return original(self, *args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # record all; the user's filters apply when they are re-emitted below
            original(*bound.args, **bound.kwargs)
        for w in caught:  # DDP's warnings use stacklevel=2: point them at the user's line again, not at this wrapper
            warnings.warn_explicit(w.message, w.category, site.filename, site.lineno, module=site.module,
                                   registry=site.warning_registry)
        _after_construction(self, ctx, site, decision, peers)

    return wrap(original, construct_with_policy)


def _after_construction(ddp, ctx, site, decision, peers):
    ctx.count("constructions")
    if decision.changed:
        ctx.count("static_graph_set" if decision.static_graph else "find_unused_turned_off")
    was = f"find_unused_parameters={decision.user_find_unused}, static_graph={decision.user_static_graph}"
    now = f"find_unused_parameters={decision.find_unused}, static_graph={decision.static_graph}"
    via = ""
    if site.framework is not None:
        via = (f" for {site.reached_from} ({site.framework.name}; value decided at "
               f"{site.decided_at or '?'}; set it with {site.framework.knob})")
    ctx.note(f"{site.where} ({site.key}){via}: " + (f"{was} -> {now}" if decision.changed else f"{now} kept")
             + f" ({decision.reason})")
    if not (decision.changed or decision.guard_first_sync or decision.observe):
        return
    try:
        import torch
        observe(ddp, Observation(ctx, site, decision, ctx.options["OBSERVE"], torch, peers))
    except Exception as exc:  # noqa: BLE001 - observing is a convenience; the decision itself is already in place
        if ctx.strict:
            raise
        ctx.note(f"{site.where}: could not observe the forward ({type(exc).__name__}: {exc})")


def choose_find_unused_policy(original, ctx):
    """The replacement of DistributedDataParallel.__init__: the policy is chosen before the object exists."""
    ctx.on_revert(forget_all)
    return _make_init(original, ctx)


def observe_find_unused(original, ctx):
    """Observe-only: DDP is built exactly as written; objects with find_unused_parameters=True are observed for the
    first SHIMS_DDP_OBSERVE iterations and a finding says when no parameter was ever unused."""
    ctx.on_revert(forget_all)
    return _make_init(original, ctx)


def fingerprint(init):
    """None when DDP looks like the one this patch was written for; else raises Skip saying why not."""
    import inspect

    from shims.patch import Skip
    try:
        parameters = inspect.signature(init).parameters
    except (TypeError, ValueError) as exc:
        raise Skip(f"DistributedDataParallel.__init__ has no readable signature: {exc}") from None
    missing = [p for p in ("find_unused_parameters", "static_graph", "process_group") if p not in parameters]
    if missing:
        raise Skip(f"DistributedDataParallel.__init__ has no parameter {', '.join(missing)}")
    owner = init.__globals__.get("DistributedDataParallel")
    needed = ("forward", "no_sync")
    absent = [n for n in needed if owner is None or not hasattr(owner, n)]
    if absent:
        raise Skip(f"DistributedDataParallel has no {', '.join(absent)} (a torch this patch was not written for)")
    return None


