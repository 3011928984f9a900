"""zero_grad(set_to_none=False): gradients zero-filled every step instead of released (the profiler pattern matcher's
GradNotSetToNonePattern, torch 2.0-2.x).

    zero-grad-filled   optimizer.zero_grad(set_to_none=False) or module.zero_grad(set_to_none=False) zero-filled
                       existing gradients: a memset of every .grad, and the gradients stay allocated through the next
                       forward, when set_to_none (the default since torch 2.0) releases them

Watches: Optimizer.zero_grad and Module.zero_grad (wrapped with plain functions), calls made by user or framework code.
Judges: a call that asked for zero-filling (set_to_none=False, or no argument where this torch's default is False)
while gradients existed. Silent on the default and on set_to_none=True.
Cost: measured: the bytes of the gradients zero-filled per call (from the first calls at a place) and the host time of
the call.
"""

from __future__ import annotations

import inspect

from shims.detect import report
from shims.detect.detector import Detector

MEASURED_CALLS = 16  # calls per place whose gradient bytes are summed (the set of gradients rarely changes after)


def _default_set_to_none(function):
    """The default of set_to_none in this torch's signature (True since torch 2.0; assumed where unreadable)."""
    try:
        default = inspect.signature(function).parameters["set_to_none"].default
    except (KeyError, TypeError, ValueError):
        return True
    return True if default is inspect.Parameter.empty else bool(default)


def _gradient_bytes(owner, optimizer_type):
    if isinstance(owner, optimizer_type):
        params = (p for group in owner.param_groups for p in group["params"])
    else:
        params = owner.parameters()
    total = 0
    for param in params:
        grad = param.grad
        if grad is not None:
            total += grad.numel() * grad.element_size()
    return total


class ZeroGrad(Detector):
    name = "zero-grad"
    kinds = {"zero-grad-filled": "zero_grad(set_to_none=False): gradients zero-filled every step instead of released"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'zero-grad-filled': (
            '`optimizer.zero_grad(set_to_none=False)` or `model.zero_grad(set_to_none=False)` zero-filling existing '
            "gradients (the profiler's `GradNotSetToNonePattern`); silent on the default and `set_to_none=True`, and "
            'on a call with no gradient yet',
            'calls that zero-filled',
            'measured: bytes of gradients written with zeros per call (kept allocated through the next forward), '
            'host time of the call and its share of the step',
            '`zero_grad()` (`set_to_none=True`, the default since torch 2.0)',
        ),
    }
    observes = "zero_grad calls"

    def install(self):
        torch = self.session.torch
        self._optimizer_type = torch.optim.Optimizer
        self._measured = {}  # where -> calls whose gradient bytes were measured (the bytes are in the finding)
        for owner in (torch.optim.Optimizer, torch.nn.Module):
            default = _default_set_to_none(getattr(owner, "zero_grad"))
            self.session.intercept(self, owner, "zero_grad", self.zero_fill,
                                   when=lambda owner, *args, default=default, **kwargs: not (
                                       kwargs["set_to_none"] if "set_to_none" in kwargs else
                                       args[0] if args else default))

    def zero_fill(self, call):
        """A zero_grad(set_to_none=False) call: measure the gradients it fills (the first calls at a place), time it."""
        session, owner = self.session, call.args[0]
        where = session.sites.caller(call.frame)
        nbytes = None
        if where is not None and self._measured.get(where, 0) < MEASURED_CALLS:
            self._measured[where] = self._measured.get(where, 0) + 1
            nbytes = _gradient_bytes(owner, self._optimizer_type)
        result = call.proceed()
        if where is None:
            return result
        found = session.peek("zero-grad-filled", where)
        nbytes = nbytes if nbytes is not None else (found.info.get("bytes", 0) if found is not None else 0)
        if nbytes:  # nothing filled (no gradient yet): no finding
            found = session.finding("zero-grad-filled", where)
            found.add(call.seconds)
            found.info["bytes"] = nbytes
            found.info["module"] = not isinstance(owner, self._optimizer_type)
        return result

    def describe(self, finding):
        seconds, nbytes, session = finding.seconds(), finding.info.get("bytes", 0), self.session
        owner = "module" if finding.info.get("module") else "optimizer"
        message = (f"{owner}.zero_grad(set_to_none=False) here zero-filled the gradients {finding.count} time(s) "
                   "instead of releasing them")
        device = "; the device work is asynchronous" if session.accelerator else ""
        cost = (f"{report.size(nbytes)} of gradients written with zeros per call (measured), and kept allocated "
                "through the next forward (released, they free up to that much of the peak); the call took "
                f"{report.ms(seconds)} on the host (median, measured{device}){session.share(seconds)}")
        fix = (f"{owner}.zero_grad() (set_to_none=True is the default since torch 2.0) or "
               f"{owner}.zero_grad(set_to_none=True); code that reads .grad between zero_grad and backward then "
               "sees None instead of zeros")
        return message, cost, fix


DETECTOR = ZeroGrad
