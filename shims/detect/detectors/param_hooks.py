"""Tensor hooks on parameters that fire when they should not.

    hook-in-autograd-grad   a hook registered with param.register_hook fired inside torch.autograd.grad, which never
                            writes .grad (ColossalAI #5601: a gradient queued for reduction that is not the param's)
    hook-fired-twice        hooks registered at one place on one parameter fired twice in one backward (registered
                            twice)

Watches: Tensor.register_hook on parameters (the hook is wrapped: it returns exactly what the user's hook returns),
torch.autograd.grad (session.on_autograd_grad: a depth counter). Hooks registered by a module where a patch's own
check is applied (ColossalAI's optimizer) are left to that patch.
Judges: a firing while autograd.grad runs; a second firing of the same (parameter, place, hook code) in one backward.
Cost: the hook's measured time per spurious firing; for a double firing, an estimate (its work done twice).
"""

from __future__ import annotations

from time import perf_counter

from shims.detect import report
from shims.detect.detector import Detector


def _hook_code(fn):
    """What identifies a hook across registrations: the code it runs (through partial objects and bound methods)."""
    for _ in range(8):  # functools.partial (nested at most a few times), as ColossalAI binds its handler
        if not hasattr(fn, "func"):
            break
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code or id(fn)


class _ParamHook:
    """Wraps a hook the user registered on a parameter; returns exactly what it returns. `key`: the parameter, the
    place and the hook's code, so that the same hook registered twice shares one key."""

    __slots__ = ("fn", "where", "key", "detector", "__weakref__")

    def __init__(self, fn, where, param_id, detector):
        self.fn, self.where, self.detector = fn, where, detector
        self.key = (param_id, where, _hook_code(fn))

    def __call__(self, grad):
        detector = self.detector
        if detector.on and detector.fired(self):
            start = perf_counter()
            result = self.fn(grad)
            detector.timed(self, perf_counter() - start)
            return result
        return self.fn(grad)


class ParamHooks(Detector):
    name = "hooks"
    kinds = {
        "hook-in-autograd-grad": "a parameter's tensor hook fired by torch.autograd.grad",
        "hook-fired-twice": "tensor hooks registered at one place on one parameter fired twice in one backward",
    }
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'hook-in-autograd-grad': (
            'a tensor hook registered with `param.register_hook` fired inside `torch.autograd.grad`, which never '
            'writes `.grad` (ColossalAI #5601)',
            'spurious firings',
            'measured time of the hook itself per spurious firing',
            '`register_post_accumulate_grad_hook` (ColossalAI: the colossalai patch)',
        ),
        'hook-fired-twice': (
            'hooks registered at one place on one parameter fired twice in one backward (registered twice)',
            'backwards with a double firing',
            "the hook's work done twice",
            'register once per parameter',
        ),
    }
    observes = "parameter tensor hooks"
    needs = ("graph_task_id",)

    def install(self):
        session = self.session
        self._in_autograd_grad = 0
        self._task_of = {}  # _ParamHook.key -> [graph task id, firings in it]
        self._graph_task = session.api.graph_task_id
        parameter = session.torch.nn.Parameter
        session.intercept(self, session.torch.Tensor, "register_hook", self._registered,
                          when=lambda tensor, *args, **kwargs: isinstance(tensor, parameter))
        session.on_autograd_grad(self, self._autograd_grad_called)

    def _registered(self, call):
        """A tensor hook registered on a parameter by the user's (or a framework's) code: register it wrapped."""
        sites = self.session.sites
        where = sites.caller(call.frame)
        if where is not None and not sites.covered(call.frame):
            if len(call.args) == 2:
                call.args[1] = _ParamHook(call.args[1], where, id(call.args[0]), self)
            elif "hook" in call.kwargs:
                call.kwargs["hook"] = _ParamHook(call.kwargs["hook"], where, id(call.args[0]), self)
        return call.proceed()

    def _autograd_grad_called(self, args, kwargs, frame):
        self._in_autograd_grad += 1
        return self._autograd_grad_done

    def _autograd_grad_done(self, result):
        self._in_autograd_grad -= 1

    def fired(self, probe):
        """Count one firing; True when it is a mistaken one (then the caller times the hook's own work)."""
        try:
            task = self._graph_task()
            seen = self._task_of.get(probe.key)
            if seen is not None and seen[0] == task:
                seen[1] += 1
                if seen[1] == 2:
                    self.session.finding("hook-fired-twice", probe.where).add()
            else:
                self._task_of[probe.key] = [task, 1]
            if self._in_autograd_grad:
                self.session.finding("hook-in-autograd-grad", probe.where).count += 1
                return True
        except Exception as exc:  # noqa: BLE001
            self.session.fail(self, exc)
        return False

    def timed(self, probe, seconds):
        found = self.session.peek("hook-in-autograd-grad", probe.where)
        if found is not None:
            found.samples.append(seconds)

    def describe(self, finding):
        if finding.kind == "hook-in-autograd-grad":
            seconds = finding.seconds()
            message = (f"a tensor hook registered here on a parameter fired {finding.count} time(s) inside "
                       "torch.autograd.grad, which never writes .grad: whatever it does (e.g. queue the gradient "
                       "for reduction) runs on a gradient that is not the parameter's")
            cost = (f"{report.ms(seconds)} per spurious firing (measured hook time); for a gradient-reduction hook, a "
                    "phantom or duplicated reduction") if seconds is not None else "one spurious hook call per firing"
            if self.session.api.post_accumulate:
                fix = ("param.register_post_accumulate_grad_hook (torch >= 2.1): it fires once per backward, after "
                       ".grad is updated, and never for autograd.grad (ColossalAI #5601, fixed in PR #5596)")
            else:  # torch 2.0: the accumulator node is what DeepSpeed and Megatron hooked before 2.1
                fix = ("hook the parameter's gradient accumulator instead (param.expand_as(param).grad_fn."
                       "next_functions[0][0].register_hook(...); keep a reference to it): it fires once per backward "
                       "and never for autograd.grad; on torch >= 2.1, param.register_post_accumulate_grad_hook "
                       "(ColossalAI #5601, fixed in PR #5596)")
            return message, cost, fix
        message = (f"tensor hooks registered here on the same parameter fired twice in one backward "
                   f"({finding.count} time(s)): the hook was registered more than once")
        cost = "estimated: the hook's work (e.g. a gradient reduction) done twice per backward"
        fix = ("register the hook once per parameter (keep its handle and call handle.remove() before "
               "registering again), or use register_post_accumulate_grad_hook")
        return message, cost, fix


DETECTOR = ParamHooks
