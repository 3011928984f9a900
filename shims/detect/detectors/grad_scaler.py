"""float16 autocast with no GradScaler: gradients underflow.

    float16-no-grad-scaler   a backward after forwards that ran under autocast(dtype=torch.float16) on an
                             accelerator, with no GradScaler.scale since the last optimizer step

Watches: each outermost forward with grad (session.on_forward: the autocast dtype for its parameters' device),
torch.autograd.backward (which Tensor.backward calls), GradScaler.scale (torch.amp's and torch.cuda.amp's, whichever
this torch has; FSDP's ShardedGradScaler from the first float16 forward after it is imported), and the optimizer steps.
Judges: a backward while a float16-autocast forward of this step is pending and no enabled GradScaler's scale() was
called in this step. Silent with a GradScaler, with bfloat16 autocast, on the CPU.
Cost: an estimate: float16 gradients below 6e-8 become zero (below 6.1e-5 they lose precision); no time cost.
"""

from __future__ import annotations

import sys

from shims.detect import devices, tensors
from shims.detect.detector import Detector

SHARDED = "torch.distributed.fsdp.sharded_grad_scaler"


def scaler_classes(torch):
    """The GradScaler classes of this torch that define scale() themselves (torch.amp's from 2.3, torch.cuda.amp's
    before; the newer torch.cuda.amp.GradScaler inherits torch.amp's)."""
    found = []
    for cls in (getattr(getattr(torch, "amp", None), "GradScaler", None),
                getattr(getattr(getattr(torch, "cuda", None), "amp", None), "GradScaler", None)):
        if cls is not None and "scale" in cls.__dict__ and cls not in found:
            found.append(cls)
    return found


class GradScalerMissing(Detector):
    name = "grad-scaler"
    kinds = {"float16-no-grad-scaler": "backward of a loss computed under float16 autocast on an accelerator "
                                       "without a GradScaler: small gradients underflow to zero"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'float16-no-grad-scaler': (
            'a backward (`loss.backward()` or `torch.autograd.backward`) while a forward of this optimizer step ran '
            'under `autocast(dtype=torch.float16)` on an accelerator and no `GradScaler.scale` was called in this '
            "step (`torch.amp.GradScaler`, `torch.cuda.amp.GradScaler`, FSDP's `ShardedGradScaler`: whichever this "
            'torch has); reported at the backward; silent with an enabled scaler (one built with `enabled=False` '
            'scales nothing: reported), with bfloat16 autocast and on the CPU',
            'backwards',
            'estimated: a correctness cost, not time: float16 gradients below 6e-8 become zero (below 6.1e-5 they '
            'lose precision)',
            '`scaler.scale(loss).backward()`, `scaler.step(optimizer)`, `scaler.update()`; or bfloat16 autocast',
        ),
    }
    observes = "float16 autocast and GradScaler"
    needs = ("step_hooks",)

    def missing(self, api):
        reason = super().missing(api)
        if reason is None and not scaler_classes(api.torch):
            reason = f"torch {api.torch.__version__} has no torch.amp.GradScaler and no torch.cuda.amp.GradScaler"
        return reason

    def install(self):
        session = self.session
        self._pending = None  # (forward where, device type) of a float16-autocast forward in this step
        self._scaled = False  # GradScaler.scale was called in this step
        for cls in scaler_classes(session.torch):
            session.wrap(cls, "scale", self._scale_wrapper)
        self._unknown = set()  # device types whose autocast state this torch cannot tell (noted at the end)
        self._sharded = False  # FSDP's ShardedGradScaler wrapped (checked when a float16 forward is seen)
        session.wrap(session.torch.autograd, "backward", self._backward_wrapper)
        session.on_forward(self, self.forward_done)
        session.on_step(self, self.step_done)

    def _wrap_sharded(self):
        """FSDP's ShardedGradScaler defines its own scale(): wrap it once its module is imported (importing it
        ourselves would load torch.distributed)."""
        module = sys.modules.get(SHARDED)
        cls = getattr(module, "ShardedGradScaler", None) if module is not None else None
        if cls is not None:
            self._sharded = True
            if "scale" in cls.__dict__:
                self.session.wrap(cls, "scale", self._scale_wrapper)

    def _scale_wrapper(self, original):
        detector = self

        def scale(self, outputs):
            enabled = getattr(self, "is_enabled", None)
            if enabled is None or enabled():  # GradScaler(enabled=False).scale returns the loss as it is
                detector._scaled = True
            return original(self, outputs)
        return scale

    def _backward_wrapper(self, original):
        detector = self

        def backward(*args, **kwargs):
            if detector.on and detector._pending is not None and not detector._scaled:
                detector.unscaled_backward(sys._getframe(1))
            return original(*args, **kwargs)
        return backward

    def unscaled_backward(self, frame):
        try:
            session = self.session
            if session.compiling():
                return
            where = session.where(frame)
            if where is None:
                return
            found = session.finding("float16-no-grad-scaler", where)
            found.add()
            found.info["forward"], found.info["device"] = self._pending
        except Exception as exc:  # noqa: BLE001 - a detector never breaks the user's run
            self.session.fail(self, exc)

    def forward_done(self, call):
        if self._pending is not None:
            return
        param = next(call.module.parameters(), None)
        if param is None or not tensors.on_accelerator(param):
            return
        torch = self.session.torch
        try:
            dtype = devices.autocast_dtype(torch, param.device.type)
        except LookupError:
            self._unknown.add(param.device.type)
            return
        if dtype == torch.float16:
            if not self._sharded:
                self._wrap_sharded()
            self._pending = (call.where, param.device.type)

    def step_done(self, optimizer):
        self._pending, self._scaled = None, False

    def finish(self):
        for device_type in sorted(self._unknown):
            self.session.record.note(f"grad-scaler: torch {self.session.torch.__version__} cannot tell whether "
                                     f"autocast is on for {device_type}: its forwards were not judged")

    def describe(self, finding):
        forward, device = finding.info.get("forward"), finding.info.get("device")
        message = (f"backward here ({finding.count} times) of a loss computed under autocast(dtype=torch.float16) on "
                   f"{device}" + (f" (forward at {forward})" if forward else "") +
                   " with no enabled GradScaler scaling it: gradients too small for float16 flush to zero")
        cost = ("estimated: a correctness cost, not a time cost: float16 gradients below 6e-8 become 0 and below "
                "6.1e-5 lose precision, so small gradients vanish (layers stop learning) or training diverges")
        torch = self.session.torch
        scaler = (f"torch.amp.GradScaler(\"{device or 'cuda'}\")" if hasattr(getattr(torch, "amp", None), "GradScaler")
                  else "torch.cuda.amp.GradScaler()")
        fix = (f"scaler = {scaler}; scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update(); "
               "or autocast with dtype=torch.bfloat16 where the device supports it (no scaler needed)")
        return message, cost, fix


DETECTOR = GradScalerMissing
