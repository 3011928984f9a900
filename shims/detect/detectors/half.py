"""`.half()` / `.to(torch.float16)` on a module with normalisation layers, then an evaluation in float16.

    half-eval   the cast, then an eval-mode forward still in float16; the message adds it when training later resumes
                with the module still float16 (RF-DETR <= 1.5 `fp16_eval`, LW-DETR)

Watches: Module.half and Module.to (wrapped), every module call (session.on_module_call) of a module cast that way.
Judges: an eval-mode forward with float16 parameters after the cast; nothing when cast back first, when the module has
no normalisation layer, or when it is only trained (deliberate float16 training). Calls made from a module where a
patch's own check is applied (rfdetr's evaluate) are left to that patch.
Cost: measured on the weights before the cast: overflow, flush to zero, subnormals, rounding error, eps too small.
"""

from __future__ import annotations

import sys
import weakref

from shims.detect import tensors
from shims.detect.detector import Detector

FP16_MAX, FP16_TINY = 65504.0, 2.0 ** -14  # largest float16, smallest normal float16


class _Halved:
    __slots__ = ("module_ref", "where", "how", "evaluated")

    def __init__(self, module_ref, where, how):
        self.module_ref, self.where, self.how, self.evaluated = module_ref, where, how, False


class HalfEval(Detector):
    name = "half"
    kinds = {"half-eval": ".half() / .to(float16) on a module with normalisation layers, then evaluated in float16"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'half-eval': (
            '`.half()` or `.to(torch.float16)` on a module that contains normalisation layers, then an eval-mode '
            'forward in float16; the message adds it when training later resumes with the module still float16 '
            '(RF-DETR <= 1.5 `fp16_eval`)',
            'casts followed by evaluation',
            'measured on the weights before the cast: values that overflow, flush to zero or turn subnormal in '
            "float16, the largest relative rounding error, `eps` below float16's normal range",
            '`torch.autocast` with float32 weights (RF-DETR: the detr patch)',
        ),
    }
    observes = ".half()/.to(float16)"

    def install(self):
        self._halved = {}  # id(module) -> _Halved
        self._damage = {}  # where -> text about the normalisation layers cast to float16
        module_type = self.session.torch.nn.Module
        self.session.wrap(module_type, "half", self._half_wrapper)
        self.session.wrap(module_type, "to", self._to_wrapper)
        self.session.on_module_call(self, self.module_called)

    def _half_wrapper(self, original):
        detector = self

        def half(self, *args, **kwargs):
            if detector.on:
                detector.cast_to_float16(self, ".half()", sys._getframe(1))
            return original(self, *args, **kwargs)
        return half

    def _to_wrapper(self, original):
        detector = self
        float16, parse_to = self.session.torch.float16, self.session.torch._C._nn._parse_to

        def to(self, *args, **kwargs):
            if detector.on:
                try:
                    dtype = parse_to(*args, **kwargs)[1]
                except Exception:  # noqa: BLE001 - bad arguments: the original raises its own error below
                    dtype = None
                if dtype is float16:
                    detector.cast_to_float16(self, ".to(torch.float16)", sys._getframe(1))
            return original(self, *args, **kwargs)
        return to

    def cast_to_float16(self, module, how, frame):
        try:
            sites = self.session.sites
            frame = sites.user_frame(frame)
            if frame is None or sites.covered(frame):
                return
            norms = [m for m in module.modules() if tensors.is_norm(m)]
            if not norms:
                return
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if where not in self._damage:
                self._damage[where] = self._fp16_damage(norms)
            self._halved[id(module)] = _Halved(weakref.ref(module), where, f"{type(module).__name__}{how}")
        except Exception as exc:  # noqa: BLE001
            self.session.fail(self, exc)

    def _fp16_damage(self, norms):
        """What float16 does to these normalisation layers' weights and statistics (measured before the cast)."""
        torch = self.session.torch
        values = overflow = flushed = subnormal = 0
        worst = 0.0
        small_eps = set()
        with torch.no_grad():
            for norm in norms:
                eps = getattr(norm, "eps", None)
                if isinstance(eps, float) and 0 < eps < FP16_TINY:
                    small_eps.add(eps)
                for tensor in list(norm.parameters(recurse=False)) + list(norm.buffers(recurse=False)):
                    if not tensor.is_floating_point() or tensor.dtype == torch.float16 or tensor.numel() == 0:
                        continue
                    exact = tensor.detach().double()
                    rounded = tensor.detach().half().double()
                    magnitude = exact.abs()
                    values += exact.numel()
                    overflow += int((magnitude > FP16_MAX).sum())
                    flushed += int(((rounded == 0) & (exact != 0)).sum())
                    subnormal += int(((magnitude < FP16_TINY) & (rounded != 0)).sum())
                    finite = (magnitude > 0) & torch.isfinite(rounded)
                    if bool(finite.any()):
                        worst = max(worst, float(((rounded - exact).abs()[finite] / magnitude[finite]).max()))
        text = (f"{len(norms)} normalisation layer(s) ({values} weights/statistics) cast to float16: {overflow} "
                f"overflow to inf, {flushed} flush to zero, {subnormal} become subnormal, max relative rounding "
                f"error {worst:.1e}")
        if small_eps:
            text += f"; eps {', '.join(f'{e:g}' for e in sorted(small_eps))} is below float16's normal range"
        return text

    def module_called(self, module):
        halved = self._halved.get(id(module)) if self._halved else None
        if halved is None:
            return
        if halved.module_ref() is not module:
            del self._halved[id(module)]
            return
        if module.training != halved.evaluated:
            return  # evaluated again, or trained before any evaluation (deliberate float16 training)
        param = next(module.parameters(), None)
        still_half = param is not None and param.dtype == self.session.torch.float16
        if not module.training:
            if not still_half:
                del self._halved[id(module)]  # cast back before evaluating: nothing to report
                return
            halved.evaluated = True
            found = self.session.finding("half-eval", halved.where)
            found.add()
            found.info["how"] = halved.how
        else:
            if still_half:
                found = self.session.finding("half-eval", halved.where)
                found.info["trained_after"] = self.session.where(sys._getframe(1))
            del self._halved[id(module)]

    def describe(self, finding):
        info = finding.info
        message = (f"{info.get('how', '.half()')} puts normalisation layers in float16, and the module was then "
                   "evaluated in float16")
        if info.get("trained_after"):
            message += f"; training resumed with it still float16 (forward at {info['trained_after']})"
        cost = self._damage.get(finding.where, "") + " (measured on the weights before the cast)"
        patch = self.session.patch_at(finding.where)
        fix = ("evaluate under torch.autocast(device_type, dtype=torch.float16) with float32 weights instead of "
               "casting the model (autocast keeps normalisation in float32); "
               + (f"the {patch} patch does this: SHIMS_MODE=fix" if patch else
                  "if a cast is needed, cast a copy and keep the normalisation layers in float32"))
        return message, cost, fix


DETECTOR = HalfEval
