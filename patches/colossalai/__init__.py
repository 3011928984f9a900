"""colossalai: reduce each accumulated gradient once, never when torch.autograd.grad runs (ColossalAI #5601).

Targets  ColossalAI's ZeRO gradient-reduction hooks, registered with `param.register_hook` (a tensor hook):
         - LowLevelZeroOptimizer (colossalai/zero/low_level/low_level_optim.py), 0.3.1 to 0.3.6:
           `_attach_reduction_hook` and `zero_grad`. Fixed upstream by PR #5596 (commit 3788fefc, first release
           0.3.7): skipped there as "fixed upstream". 0.3.0 and the 0.2.x sharded_optim had another shape: left
           alone, the receipt says why.
         - GeminiDDP (colossalai/zero/gemini/gemini_ddp.py), every version up to 0.5.0: `grad_handle`.
Bug      A tensor hook also fires for `torch.autograd.grad(loss, param)`, which never writes `param.grad`. VQGAN/VAE
         losses compute an adaptive weight that way, twice per step, before the real backward (taming-transformers).
         LowLevelZero then queues the parameter in its reduction bucket without a gradient: the flush crashes on
         `None`, or reduces the same gradient twice. Gemini runs its whole reduction inside the hook and returns a
         freed tensor: the autograd.grad caller gets that tensor back, or the hook raises on the chunk state.
Fix      LowLevelZero, as PR #5596 did: a post-accumulate-grad hook instead (it fires once per backward, after
         `.grad` is updated, and never for autograd.grad), and `zero_grad()` empties the bucket store.
         Gemini (no upstream fix): its tensor hook lets the gradient pass through untouched and defers the reduction
         to the post-accumulate-grad hook of the same backward (`gradhooks.defer_until_accumulated`), so
         autograd.grad callers get the real gradient and reduction happens in backward only.
The work: one replacement per target (`TARGETS` at the end pairs each with its fingerprint and observer):
`attach_post_accumulate_hooks`, `zero_grad_emptying_bucket`, `defer_gemini_reduction`.
Detect mode (`observe_attach`, `observe_zero_grad`, `observe_gemini_hook`) counts hook firings outside backward and
repeated within one; changes nothing.
Instances built while patched keep their hooks after shims.disable() (the class attributes are restored).
Docs: docs/patches/colossalai.md (hook semantics table, versions, how it is verified).
"""

from shims.patch import Patch, Skip, Target

LOW_LEVEL_MODULE = "colossalai.zero.low_level.low_level_optim"
GEMINI_MODULE = "colossalai.zero.gemini.gemini_ddp"
LOW_LEVEL_SUPPORTED = ">=0.3.1,<0.3.7"  # 0.3.1-0.3.6: `_grad_handler(self, param, group_id, grad)` via register_hook
LOW_LEVEL_FIXED_IN = "0.3.7"  # PR #5596, commit 3788fefc

# Torch 2.0 has no post-accumulate-grad hook: gradhooks uses the gradient-accumulator node there (as DeepSpeed and
# Megatron did before 2.1)
TORCH_RANGE = ">=2.0"


def _function(original):
    return original.__func__ if isinstance(original, (staticmethod, classmethod)) else original


def _where(original):
    code = getattr(_function(original), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None


def _source(func):
    import inspect
    try:
        return inspect.getsource(func)
    except (OSError, TypeError) as exc:
        raise Skip(f"cannot read the source of {getattr(func, '__qualname__', func)!r}: {exc}") from None


def attach_fingerprint(original):
    """`_attach_reduction_hook` registers `self._grad_handler` with `param.register_hook` (0.3.1-0.3.6)."""
    source = _source(_function(original))
    if "register_post_accumulate_grad_hook" in source:
        raise Skip("_attach_reduction_hook already registers post-accumulate-grad hooks (upstream PR #5596)",
                   status="fixed-upstream")
    if ".register_hook(" not in source or "self._grad_handler" not in source:
        raise Skip("_attach_reduction_hook does not register self._grad_handler with param.register_hook")


def zero_grad_fingerprint(original):
    """`zero_grad` does not empty the bucket store yet (PR #5596 added `reset_all` there)."""
    if "reset_all" in _source(_function(original)):
        raise Skip("zero_grad already resets the bucket store (upstream PR #5596)", status="fixed-upstream")


def gemini_fingerprint(original):
    """`grad_handle` takes the parameter `p` and the gradient `grad`."""
    import inspect
    params = inspect.signature(_function(original)).parameters
    if "p" not in params or "grad" not in params:
        raise Skip(f"grad_handle{inspect.signature(_function(original))} has no `p` and `grad` parameters")


def _low_level_checks(ctx):
    """Skip LowLevelZero targets whose class lacks the methods the replacement calls (the engine already refused
    versions outside 0.3.1-0.3.6: the targets' own ranges)."""
    import inspect
    cls = getattr(ctx.module, "LowLevelZeroOptimizer", None)
    handler = getattr(cls, "_grad_handler", None)
    if handler is None or list(inspect.signature(handler).parameters) != ["self", "param", "group_id", "grad"]:
        raise Skip("LowLevelZeroOptimizer._grad_handler is not `(self, param, group_id, grad)`")
    for needed in ("_add_to_bucket", "num_param_groups"):
        if not hasattr(cls, needed):
            raise Skip(f"LowLevelZeroOptimizer has no {needed!r}")


def _gemini_checks(ctx):
    """Skip when GeminiDDP no longer registers grad_handle as a tensor hook (an upstream fix would change that)."""
    cls = getattr(ctx.module, "GeminiDDP", None)
    source = _source(getattr(cls, "__init__", None))
    if "register_post_accumulate_grad_hook" in source:
        raise Skip("GeminiDDP registers post-accumulate-grad hooks already", status="fixed-upstream")
    if ".register_hook(" not in source or "grad_handle" not in source:
        raise Skip("GeminiDDP.__init__ does not register grad_handle with param.register_hook")


# ---------------------------------------------------------------- fix mode

def attach_post_accumulate_hooks(original, ctx):
    """`_attach_reduction_hook` as PR #5596 changed it: the same parameters, each with a post-accumulate-grad hook."""
    from functools import partial
    _low_level_checks(ctx)

    from shims.patches.colossalai import gradhooks
    from shims.patch import wrap
    ctx.note(f"gradient-ready signal: {gradhooks.post_accumulate_mechanism()}")

    def hand_gradient_to_colossalai(optimizer, group_id, param):
        ctx.count("post_accumulate_hook_calls")
        # upstream's own handler: it checks no_sync (require_grad_sync) and appends the parameter to the bucket
        optimizer._grad_handler(param, group_id, param.grad)

    def attach_accumulated_hooks(wrapped, self, args, kwargs):
        handles = []
        try:
            for group_id in range(self.num_param_groups):
                for param in self._working_param_groups[group_id]:
                    if param.requires_grad:
                        hook = partial(hand_gradient_to_colossalai, self, group_id)
                        handles.append(gradhooks.register_reduction_hook(param, hook))
        except Exception as exc:  # noqa: BLE001 - fall back to upstream's tensor hooks rather than break training
            for handle in handles:
                handle.remove()
            if ctx.strict:
                raise
            ctx.count("fallbacks_to_tensor_hooks")
            ctx.note(f"fell back to upstream's tensor hooks: {type(exc).__name__}: {exc}")
            return wrapped(*args, **kwargs)
        ctx.count("post_accumulate_hooks_attached", len(handles))
        return None

    return wrap(original, attach_accumulated_hooks)


def _empty_bucket_store(optimizer):
    store = optimizer._bucket_store
    if hasattr(store, "reset_all"):
        store.reset_all()
    else:
        # 0.3.1-0.3.6 have no reset_all; their BucketStore.__init__ is exactly the empty state (0.3.7 split it out)
        type(store).__init__(store, optimizer.dp_pg)


def zero_grad_emptying_bucket(original, ctx):
    """`zero_grad` followed by emptying the bucket store, as PR #5596 added: parameters queued before zero_grad
    would otherwise be flushed with `.grad = None`."""
    from shims.patch import wrap
    _low_level_checks(ctx)

    def zero_grad_then_empty(wrapped, self, args, kwargs):
        result = wrapped(*args, **kwargs)
        _empty_bucket_store(self)
        return result

    return wrap(original, zero_grad_then_empty)


def defer_gemini_reduction(original, ctx):
    """GeminiDDP's tensor hook, made a pass-through that hands the reduction to the post-accumulate-grad hook.

    The tensor hook cannot tell backward from torch.autograd.grad; the post-accumulate-grad hook fires in backward
    only, right after the same AccumulateGrad node, in the same graph task (see gradhooks.py). So the tensor hook
    arms the reduction, and `reduce_accumulated` runs Gemini's own handler on the accumulated `param.grad`.
    """
    import inspect
    from functools import partial

    from shims.patches.colossalai import gradhooks
    _gemini_checks(ctx)
    func = _function(original)
    signature = inspect.signature(func)
    ctx.note(f"gradient-ready signal: {gradhooks.post_accumulate_mechanism()}")

    def reduce_accumulated(arguments, param):
        arguments["grad"] = param.grad
        bound = inspect.BoundArguments(signature, arguments)
        func(*bound.args, **bound.kwargs)
        # the gradient now lives in Gemini's chunk; upstream left a freed tensor in .grad until _post_backward
        param.grad = None
        ctx.count("gradients_reduced")

    def grad_handle(*args, **kwargs):
        ctx.count("tensor_hook_calls")
        try:
            bound = signature.bind(*args, **kwargs)
            param = bound.arguments["p"]
            arguments = dict(bound.arguments)
            arguments["grad"] = None  # the deferred work must not keep this firing's gradient alive
            gradhooks.defer_until_accumulated(param, partial(reduce_accumulated, arguments))
        except Exception as exc:  # noqa: BLE001 - fall back to upstream's behaviour rather than break training
            if ctx.strict:
                raise
            ctx.count("fallbacks_to_tensor_hook")
            ctx.note(f"ran upstream's tensor hook instead: {type(exc).__name__}: {exc}")
            return func(*args, **kwargs)
        return None  # the gradient passes through untouched: an autograd.grad caller gets the real one

    # a plain function, not a wrapt proxy: upstream binds it into a functools.partial per parameter, called in backward
    grad_handle.__doc__ = "shims: Gemini's reduction deferred to the post-accumulate-grad hook (ColossalAI #5601)"
    grad_handle.__qualname__ = func.__qualname__
    return staticmethod(grad_handle) if isinstance(original, staticmethod) else grad_handle


# ---------------------------------------------------------------- detect mode

def _audit(ctx, original):
    from shims.patches.colossalai import gradhooks
    where = _where(original)

    def outside_backward(param, n):
        ctx.count("hook_calls_outside_backward", n)
        ctx.finding("hook-outside-backward",
                    f"{ctx.target.qualname}: ColossalAI's gradient-reduction tensor hook fired for a "
                    "torch.autograd.grad call, which accumulates no gradient (ColossalAI #5601)",
                    where=where, count=n,
                    cost="LowLevelZero: a crash on a None gradient or a gradient reduced twice; Gemini: a spurious "
                         "reduction, a RuntimeError, or a freed tensor returned to the caller",
                    fix="SHIMS_MODE=fix with the colossalai patch (LowLevelZero: or colossalai >= 0.3.7)")

    def repeated(param, n):
        ctx.count("hook_calls_repeated_in_backward", n)
        ctx.finding("hook-repeated-in-backward",
                    f"{ctx.target.qualname}: ColossalAI's gradient-reduction hook fired more than once for one "
                    "parameter in one backward (registered twice?)",
                    where=where, count=n, cost="the same gradient queued for reduction more than once",
                    fix="build one ZeRO optimizer / GeminiDDP per set of parameters")

    return gradhooks.GradHookAudit(on_outside_backward=outside_backward, on_repeated=repeated)


def _observed_call(ctx, original, call):
    """Run the observed hook; if it raises, say so in the receipt (phantom firings often end so), then re-raise."""
    try:
        return call()
    except Exception as exc:
        ctx.finding("hook-raised", f"{ctx.target.qualname}: ColossalAI's gradient-reduction hook raised "
                    f"{type(exc).__name__}: {str(exc)[:300]}", where=_where(original),
                    cost="the step fails; under torch.autograd.grad (ColossalAI #5601) the fix mode avoids it",
                    fix="SHIMS_MODE=fix with the colossalai patch")
        raise


def observe_attach(original, ctx):
    """Observe-only `_attach_reduction_hook`: upstream's tensor hooks, each firing audited."""
    from shims.patch import wrap
    _low_level_checks(ctx)
    audit = _audit(ctx, original)

    def attach_observed(wrapped, self, args, kwargs):
        handler = self._grad_handler

        def observed_handler(param, group_id, grad):
            audit.fired(param)
            return _observed_call(ctx, original, lambda: handler(param, group_id, grad))

        # upstream binds self._grad_handler into each hook: shadow it on the instance while it does
        self.__dict__["_grad_handler"] = observed_handler
        try:
            return wrapped(*args, **kwargs)
        finally:
            self.__dict__.pop("_grad_handler", None)

    return wrap(original, attach_observed)


def observe_zero_grad(original, ctx):
    """Observe-only `zero_grad`: a finding when it leaves gradients queued for reduction."""
    from shims.patch import wrap
    _low_level_checks(ctx)
    where = _where(original)

    def zero_grad_observed(wrapped, self, args, kwargs):
        result = wrapped(*args, **kwargs)
        store = getattr(self, "_bucket_store", None)
        queued = store.num_elements_in_bucket() if hasattr(store, "num_elements_in_bucket") else 0
        if queued:
            ctx.finding("stale-bucket", f"zero_grad() left {queued} gradient elements queued for reduction; "
                        "their .grad is now None and the next flush will fail on it", where=where,
                        fix="SHIMS_MODE=fix with the colossalai patch (or colossalai >= 0.3.7)")
        return result

    return wrap(original, zero_grad_observed)


def observe_gemini_hook(original, ctx):
    """Observe-only `GeminiDDP.grad_handle`: upstream's hook, each firing audited."""
    import inspect
    _gemini_checks(ctx)
    func = _function(original)
    signature = inspect.signature(func)
    audit = _audit(ctx, original)

    def grad_handle(*args, **kwargs):
        audit.fired(signature.bind(*args, **kwargs).arguments["p"])
        return _observed_call(ctx, original, lambda: func(*args, **kwargs))

    grad_handle.__qualname__ = func.__qualname__
    return staticmethod(grad_handle) if isinstance(original, staticmethod) else grad_handle


# per target: its ranges (LowLevelZero was fixed upstream in 0.3.7, GeminiDDP never was), its shape check, its
# replacement and its observer
TARGETS = (
    Target(LOW_LEVEL_MODULE, "LowLevelZeroOptimizer._attach_reduction_hook", supported=LOW_LEVEL_SUPPORTED,
           fixed_in=LOW_LEVEL_FIXED_IN, fingerprint=attach_fingerprint, replace=attach_post_accumulate_hooks,
           detect=observe_attach),
    Target(LOW_LEVEL_MODULE, "LowLevelZeroOptimizer.zero_grad", supported=LOW_LEVEL_SUPPORTED,
           fixed_in=LOW_LEVEL_FIXED_IN, fingerprint=zero_grad_fingerprint, replace=zero_grad_emptying_bucket,
           detect=observe_zero_grad),
    Target(GEMINI_MODULE, "GeminiDDP.grad_handle", fingerprint=gemini_fingerprint, replace=defer_gemini_reduction,
           detect=observe_gemini_hook),
)


PATCH = Patch(
    name="colossalai",
    summary="reduce each accumulated gradient once, not on torch.autograd.grad calls (ColossalAI #5601, PR #5596)",
    targets=TARGETS,  # each brings its own fingerprint, replace and detect
    distribution="colossalai",
    torch=TORCH_RANGE,
    docs="docs/patches/colossalai.md",
    upstream="hpcaitech/ColossalAI#5601, PR #5596 (3788fefc, first release 0.3.7); GeminiDDP unfixed as of 0.5.0",
)
