"""Keep the optimizer-step clock running after torch.compile on torch 2.0-2.2.

There, the first torch.compile runs `torch._dynamo.eval_frame.TorchPatcher.patch()`, which unwraps every torch.optim
optimizer class's `step` from the profiling wrapper that calls the global step hooks, and marks the bare `step` as
`hooked` so it is never wrapped again. From then on `register_optimizer_step_post_hook` hears no step of a built-in
optimizer, and every per-step detector would silently find nothing (torch 2.5 and later keep the wrapper).

So: once that patch has run, each torch.optim class whose `step` is no longer torch's profiling wrapper gets a plain
wrapper that tells the session's step clock, as the global hook did; shims' revert puts torch's `step` back. Detected
by effect (is `step` still the profiling wrapper?), not by version.
"""

from __future__ import annotations


def install(session):
    """Watch for the patch (now, if torch._dynamo is already imported, or when it is)."""
    from shims import hooks
    torch = session.torch
    optimizer_base = torch.optim.Optimizer
    make_profiled = getattr(optimizer_base, "profile_hook_step", None)
    if make_profiled is None:
        return  # a torch without the profiling wrapper: nothing can unwrap it
    profiled_code = make_profiled(lambda *a, **k: None).__code__

    def unhooked_classes():
        for value in list(vars(torch.optim).values()):
            if isinstance(value, type) and issubclass(value, optimizer_base) and value is not optimizer_base:
                step = value.__dict__.get("step")
                code = getattr(step, "__code__", None)
                if step is not None and getattr(step, "hooked", False) and code is not profiled_code \
                        and getattr(step, "__shims_original__", None) is None:
                    yield value

    def rehook():
        for cls in unhooked_classes():
            session.wrap(cls, "step", _counting_step(session))

    def patch_then_rehook(current):
        def patch(*args, **kwargs):
            result = current(*args, **kwargs)
            try:
                rehook()
            except Exception as exc:  # noqa: BLE001 - never break the user's torch.compile
                session.fail("optimizer-steps", exc)
            return result
        return patch

    def on_eval_frame(module):
        patcher = getattr(module, "TorchPatcher", None)
        if patcher is None or not session.active:
            return
        if "patch" in vars(patcher):
            session.wrap(patcher, "patch", patch_then_rehook)
        rehook()  # it may have run already

    hooks.when_imported("torch._dynamo.eval_frame", on_eval_frame)
    session.add_undo(lambda: hooks.forget(on_eval_frame))


def _counting_step(session):
    def make(current):
        def step(self, *args, **kwargs):
            result = current(self, *args, **kwargs)
            session._after_step(self, args, kwargs)
            return result
        step.hooked = True  # torch's own mark: its profiler never wraps this step again
        return step
    return make
