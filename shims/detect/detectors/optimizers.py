"""Optimizers that update accelerator parameters one tensor at a time (neither foreach nor fused).

    optimizer-for-loop   a torch optimizer with a foreach option (Adam, AdamW, SGD, ...) stepping accelerator
                         parameters with its for-loop implementation: foreach=False, or foreach left to torch's
                         default where that default is the for-loop for these parameters

Watches: Optimizer.__init__ (where it was built), the optimizer steps (session.on_step; the first step judges, so
the parameters have their final device), and the host time of step() of the optimizers judged (a global step
pre-hook, where torch has one).
Judges: per optimizer, at its first step: parameters on an accelerator; no group with fused=True or foreach=True
counts; foreach=False counts; foreach=None counts when torch's own rule picks the for-loop for these parameters
(devices.default_implementation, i.e. torch.optim.optimizer._default_to_fused_or_foreach) and fused kernels exist
for the device (else there is nothing better to use). Silent on the CPU, with foreach=True, fused=True,
differentiable=True, and on torch's defaults where they pick foreach (CUDA).
Cost: the measured host time of step(); an estimate of the kernel launches the for-loop adds.
"""

from __future__ import annotations

import inspect
import weakref
from time import perf_counter

from shims.detect import devices, report, sites, tensors
from shims.detect.detector import Detector

KERNELS_PER_TENSOR = 8  # launches per parameter tensor and step of Adam/AdamW's for-loop (SGD with momentum: ~3)


class _Judged:
    __slots__ = ("where", "name", "reason", "tensors", "device", "fused", "started")

    def __init__(self, where, name, reason, count, device, fused):
        self.where, self.name, self.reason, self.tensors, self.device = where, name, reason, count, device
        self.fused, self.started = fused, None


class ForLoopOptimizers(Detector):
    name = "optimizers"
    kinds = {"optimizer-for-loop": "an optimizer updating accelerator parameters one tensor at a time (neither "
                                   "foreach nor fused)"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'optimizer-for-loop': (
            'a torch optimizer with a `foreach` option (Adam, AdamW, SGD, ...) stepping accelerator parameters one '
            "tensor at a time: `foreach=False`, or `foreach` left at its default where torch's own rule "
            '(`torch.optim.optimizer._default_to_fused_or_foreach`, asked, not copied) picks the for-loop for these '
            'parameters while fused kernels exist for the device; reported where the optimizer was built; silent on '
            'the defaults where torch picks foreach (CUDA), with `foreach=True`, `fused=True`, '
            '`differentiable=True`, and on the CPU',
            'optimizer steps',
            'measured host time of `step()` (from the second step) and its share of the step; estimated kernel '
            'launches (8 per parameter tensor for Adam) that foreach groups into a few per group and fused into '
            'about one',
            '`fused=True` where this torch has fused kernels for the device (Adam/AdamW on CUDA since 2.0), else '
            'leave `foreach` at its default / `foreach=True`',
        ),
    }
    observes = "optimizer implementations"
    needs = ("step_hooks",)

    def install(self):
        session = self.session
        from torch.optim import optimizer as optimizer_module
        self._built = weakref.WeakKeyDictionary()  # optimizer -> where it was built
        self._judged = weakref.WeakKeyDictionary()  # optimizer -> _Judged (a for-loop) or None (fine)
        self._timed = {}  # id(optimizer) -> _Judged, for the step pre-hook
        session.wrap(session.torch.optim.Optimizer, "__init__",
                     sites.after_construction(self, self._remember_construction))
        pre_hook = getattr(optimizer_module, "register_optimizer_step_pre_hook", None)
        if pre_hook is not None:
            handle = pre_hook(self._before_step)
            session.add_undo(handle.remove)
        else:
            session.record.note("optimizers: this torch has no register_optimizer_step_pre_hook: the host time of "
                                "step() is not measured")
        if devices.default_implementation(session.torch, [], False) is None:
            session.record.note("optimizers: this torch has no torch.optim.optimizer._default_to_fused_or_foreach: "
                                "optimizers left at foreach=None are not judged")
        session.on_step(self, self.step_done)

    def _remember_construction(self, optimizer, where):
        self._built[optimizer] = where

    def _before_step(self, optimizer, args, kwargs):
        judged = self._timed.get(id(optimizer))
        if judged is not None and self.on:
            judged.started = perf_counter()

    def step_done(self, optimizer):
        if optimizer in self._judged:
            judged = self._judged[optimizer]
            if judged is not None:
                found = self.session.finding("optimizer-for-loop", judged.where)
                found.add(None if judged.started is None else perf_counter() - judged.started)
                judged.started = None
            return
        judged = self._judged[optimizer] = self.judge(optimizer)
        if judged is not None:
            self._timed[id(optimizer)] = judged
            found = self.session.finding("optimizer-for-loop", judged.where)
            found.add()  # the first step is counted, not timed: it also creates the optimizer's state
            found.info["judged"] = judged

    def judge(self, optimizer):
        """A _Judged when a group with accelerator parameters runs the for-loop, else None."""
        where = self._built.get(optimizer)
        groups = optimizer.param_groups
        if where is None or not groups or not all("foreach" in group for group in groups):
            return None  # built before detect mode began, or an optimizer without a foreach option
        torch, reasons, count, device = self.session.torch, [], 0, None
        has_fused = "fused" in _parameters(type(optimizer).__init__)
        for group in groups:
            params = [p for p in group["params"] if isinstance(p, torch.Tensor)]
            if not params or not tensors.on_accelerator(params[0]):
                continue
            if group.get("fused") or group["foreach"] or group.get("differentiable"):
                continue  # differentiable=True: neither foreach nor fused supports it
            fused = has_fused and params[0].device.type in devices.fused_devices(torch)
            if group["foreach"] is False:
                reason = "foreach=False"
            elif fused and devices.default_implementation(torch, params, False) == "for-loop":
                # torch's default is the for-loop here (no foreach kernels for these parameters); fused has them
                reason = "foreach left to torch's default, which picks the for-loop for these parameters"
            else:
                continue
            if reason not in reasons:
                reasons.append(reason)
            count += len(params)
            device = params[0].device.type
        if not reasons:
            return None
        fused = has_fused and device in devices.fused_devices(torch)
        return _Judged(where, type(optimizer).__name__, "; ".join(reasons), count, device, fused)

    def describe(self, finding):
        judged, session = finding.info["judged"], self.session
        message = (f"{judged.name} built here updates {judged.tensors} parameter tensors on {judged.device} one at a "
                   f"time ({judged.reason}), in {finding.count} optimizer steps")
        seconds = finding.seconds()
        measured = (f"{report.ms(seconds)} of host time per step() (measured){session.share(seconds)}; "
                    if seconds is not None else "")
        cost = (f"{measured}estimated: about {KERNELS_PER_TENSOR * judged.tensors} kernel launches per step "
                f"({KERNELS_PER_TENSOR} per tensor for Adam), where foreach launches a few per group of tensors "
                "and fused about one")
        fix = (f"{judged.name}(..., fused=True) (fastest here), or leave foreach at its default (None)" if judged.fused
               else f"{judged.name}(..., foreach=True), or leave foreach at its default where torch picks foreach")
        return message, cost, fix


def _parameters(function):
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


DETECTOR = ForLoopOptimizers
