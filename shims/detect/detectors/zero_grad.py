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
import sys
from time import perf_counter

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
        self._bytes = {}  # where -> [calls measured, bytes zero-filled by the last call measured]
        self.session.wrap(torch.optim.Optimizer, "zero_grad", self._zero_grad_wrapper)
        self.session.wrap(torch.nn.Module, "zero_grad", self._zero_grad_wrapper)

    def _zero_grad_wrapper(self, original):
        detector, default = self, _default_set_to_none(original)

        def zero_grad(self, *args, **kwargs):
            if detector.on:
                set_to_none = kwargs["set_to_none"] if "set_to_none" in kwargs else args[0] if args else default
                if not set_to_none:
                    return detector.zero_fill(original, self, args, kwargs, sys._getframe(1))
            return original(self, *args, **kwargs)
        return zero_grad

    def zero_fill(self, original, owner, args, kwargs, frame):
        session = self.session
        try:
            where = None if session.compiling() else session.sites.caller(frame)
            site = None
            if where is not None:
                site = self._bytes.get(where)
                if site is None:
                    site = self._bytes[where] = [0, 0]
                if site[0] < MEASURED_CALLS:
                    site[0] += 1
                    site[1] = _gradient_bytes(owner, self._optimizer_type)
        except Exception as exc:  # noqa: BLE001 - a detector never breaks the user's run
            session.fail(self, exc)
            site = None
        start = perf_counter()
        result = original(owner, *args, **kwargs)
        seconds = perf_counter() - start
        if site is not None and site[1] and self.on:
            found = session.finding("zero-grad-filled", where)
            found.add(seconds)
            found.info["bytes"] = site[1]
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
