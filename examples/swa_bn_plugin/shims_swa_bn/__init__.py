"""swa_bn: re-estimate BatchNorm statistics after SWA without building autograd graphs (pytorch #52055).

Target   `bn_update(loader, model)`, the BatchNorm re-estimation pass of the SWA reference implementation
         (timgaripov/swa `utils.py`), copied into many training repositories, and `torch.optim.swa_utils.update_bn`,
         which took it into PyTorch (PR #30559).
Bug      The pass runs a forward over the whole training set with gradients enabled: every batch builds an autograd
         graph (activations kept until the output is dropped), for a pass that never calls backward. On a large
         model this is the out-of-memory reported in pytorch issue #52055.
Upstream fix: pytorch PR #52654 (first release 1.9) decorated `update_bn` with `@torch.no_grad()`. Copies of the SWA
         reference code never got it.
Fix      The same: the function runs under `torch.no_grad()`. Forward results, and so the BatchNorm statistics, are
         the same bits (no_grad changes what autograd records, not what is computed).

The module imports nothing but shims.patch: shims imports it when torch is imported (its trigger, in pyproject.toml).
"""

from shims.patch import Option, Patch, Skip, Target, wrap


def _targets(options):
    user = tuple(Target(module, function) for module in options["MODULES"] for function in options["FUNCTIONS"])
    # torch's own function: fixed upstream in 1.9, so shims reports "fixed-upstream" on any torch it supports
    return (Target("torch.optim.swa_utils", "update_bn", distribution="torch", fixed_in="1.9"),) + user


def fingerprint(function):
    """None when `function` runs a BatchNorm re-estimation pass with gradients on; raises Skip otherwise."""
    import inspect
    try:
        source = inspect.getsource(function)
        parameters = list(inspect.signature(function).parameters)
    except (OSError, TypeError, ValueError) as exc:
        raise Skip(f"cannot read {getattr(function, '__qualname__', function)!r}: {exc}") from None
    if parameters[:2] not in (["loader", "model"], ["model", "loader"]):
        raise Skip(f"{function.__qualname__}{inspect.signature(function)} does not take (loader, model)")
    if "no_grad" in source or "inference_mode" in source:
        raise Skip(f"{function.__qualname__} already turns gradients off (as pytorch PR #52654 did)",
                   status="fixed-upstream")
    if "momentum" not in source:
        raise Skip(f"{function.__qualname__} does not set BatchNorm momenta: not a re-estimation pass")


def run_without_grad(original, ctx):
    """The replacement: the same function, called under torch.no_grad()."""

    def without_grad(wrapped, instance, args, kwargs):
        import torch
        ctx.count("passes_without_grad")
        with torch.no_grad():
            return wrapped(*args, **kwargs)

    return wrap(original, without_grad)


def detect_grad_enabled(original, ctx):
    """Observe-only: a finding when the pass runs with gradients enabled."""

    def observed(wrapped, instance, args, kwargs):
        import torch
        if torch.is_grad_enabled():
            ctx.finding("bn-update-with-grad", f"{original.__qualname__} re-estimates BatchNorm statistics with "
                        "gradients enabled: every batch builds an autograd graph (pytorch #52055)",
                        cost="the activations of one forward per batch kept for a backward that never runs",
                        fix="SHIMS_MODE=fix with the swa_bn patch, or wrap the call in torch.no_grad()")
        return wrapped(*args, **kwargs)

    return wrap(original, observed)


PATCH = Patch(
    name="swa_bn",
    summary="BatchNorm re-estimation after SWA under torch.no_grad() (pytorch #52055, fixed in torch by PR #52654)",
    targets=_targets,
    replace=run_without_grad,
    detect=detect_grad_enabled,
    fingerprint=fingerprint,
    torch=">=2.0",
    options=(
        Option("MODULES", "list", default=("utils", "swa_utils"),
               help="modules that define a copy of the SWA reference bn_update"),
        Option("FUNCTIONS", "list", default=("bn_update",), help="function names to look for in MODULES"),
    ),
    docs="https://github.com/pytorch/pytorch/issues/52055",
    upstream="pytorch/pytorch#52055, PR #52654 (first release 1.9); copies of timgaripov/swa utils.bn_update",
)
