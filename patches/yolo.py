"""yolo: validation during training keeps the live EMA in float32 and runs forward and loss under autocast.

Target   ultralytics `BaseValidator.__call__` (`ultralytics.engine.validator`; `ultralytics.yolo.engine.validator`
         in the first 8.0 releases) for ultralytics >= 8.0, < 8.4.62; YOLOv5's `val.run` (the `yolov5` package's
         `yolov5.val`, and a clone's top-level `val`) and YOLOv7's `test.test` (a clone's `test`): the clone modules
         are named by SHIMS_YOLO_SITES (module:function, default `val:run,test:test`).
Bug      during training the validator casts the model it is given, the trainer's live EMA, with `model.half()`
         (ultralytics `model = model.half() if self.args.half else model.float()`, YOLOv5 `val.py:187`, YOLOv7
         `test.py:66-68`), evaluates in float16 and casts back with `model.float()`: every validation rounds the EMA
         to float16 in place; a weight above 65504 becomes inf, stays inf, and ultralytics then skips every
         checkpoint save (ultralytics issue #24615).
Upstream ultralytics 8.4.62 (PR #24731): the model stays float32, inference and loss run under autocast. YOLOv5 and
         YOLOv7 have no fix.
The patch: `validate_in_float32` (built by `replace_validation`) runs the original validator with the model's `.half()`
         turned into what PR #24731 put there (`model.float()`): for the duration of the call the model carries
         instance attributes `half`, `forward` and (ultralytics) `loss`; once the validator has asked for `.half()`,
         forward and loss run under `torch.autocast(<model's device type>)` with torch's default dtype for that
         device (float16 on CUDA), as 8.4.62 does. On CPU the validators never ask for half: the call passes through.
         Parameters and buffers come out as they went in (dtype, values, storage); gradients are off. Only
         functions whose source calls `model.half()` are wrapped (`read_half_calls`). Docs: docs/patches/yolo.md.
"""

from shims.patch import Option, Patch, Skip, Target, function_def

ULTRALYTICS_FIXED_IN = "8.4.62"  # PR #24731: weights stay float32, inference and loss under autocast
ULTRALYTICS_SUPPORTED = ">=8.0"
VALIDATOR = "BaseValidator.__call__"
ULTRALYTICS_TARGETS = tuple(
    Target(module, VALIDATOR, distribution="ultralytics", supported=ULTRALYTICS_SUPPORTED,
           fixed_in=ULTRALYTICS_FIXED_IN)
    for module in ("ultralytics.engine.validator", "ultralytics.yolo.engine.validator"))
YOLOV5_TARGET = Target("yolov5.val", "run", distribution="yolov5")  # no upstream fix (7.0.14 checked)
DEFAULT_SITES = ("val:run", "test:test")  # a YOLOv5 clone's val.py, a YOLOv7 clone's test.py
MODEL = "model"  # the name every validator gives the model it casts


def _targets(options):
    user = tuple(Target(*site.split(":", 1)) for site in options["SITES"])
    known = ULTRALYTICS_TARGETS + (YOLOV5_TARGET,)
    return known + tuple(t for t in user if t not in known)


def _takes_trainer(func):
    """ultralytics' validator: the model comes from `trainer.ema.ema or trainer.model`."""
    return func.__name__ == "__call__"


# ---------------------------------------------------------------- reading the function


def read_half_calls(func):
    """(file, [(line, text)]) of the `model.half()` calls in `func`'s source; raises Skip when there is none or when
    the function lacks what the replacement needs (a `model` or `trainer` parameter)."""
    import ast

    unwrapped, node, params = function_def(func)  # ultralytics and YOLOv5 decorate with smart_inference_mode()
    needed = "trainer" if _takes_trainer(unwrapped) else MODEL
    if needed not in params:
        raise Skip(f"{unwrapped.__qualname__} has no `{needed}` parameter: not a training-time validator")
    halves = sorted((sub.lineno, ast.unparse(sub)) for sub in ast.walk(node)
                    if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "half"
                    and isinstance(sub.func.value, ast.Name) and sub.func.value.id == MODEL
                    and not sub.args and not sub.keywords)
    if not halves:
        raise Skip(f"{unwrapped.__qualname__} never calls `model.half()`: nothing to fix", status="skipped-benign")
    return unwrapped.__code__.co_filename, halves


def fingerprint(func):
    """None when `func` calls `model.half()` on a model it is given; raises Skip with the reason otherwise."""
    read_half_calls(func)


# ---------------------------------------------------------------- running the validation


_MISSING = object()


def _version(tensor):
    """The version counter; None for an inference tensor, which has none (an EMA cast back with model.float()
    inside a validator's inference_mode, e.g. by an earlier unpatched validation, is made of them)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _state_of(modules):
    """Per tensor: (name, tensor, dtype, device, requires_grad, version, data pointer)."""
    return [(f"{type(m).__name__}.{name}", t, t.dtype, t.device, t.requires_grad, _version(t), t.data_ptr())
            for m in modules for name, t in list(m.named_parameters()) + list(m.named_buffers())]


def _changed(before):
    return [e[0] for e in before
            if (e[1].dtype, e[1].device, e[1].requires_grad, _version(e[1]), e[1].data_ptr()) != e[2:]]


def _device_type(module):
    for tensor in module.parameters():
        return tensor.device.type
    return "cpu"


def _autocast_or_none(torch, device_type):
    """torch.autocast for this device with torch's default dtype for it (what ultralytics 8.4.62 uses), or None when
    this torch has no autocast there (e.g. MPS before torch 2.5)."""
    try:
        context = torch.autocast(device_type)
        with context:
            pass
        return lambda: torch.autocast(device_type)
    except Exception:  # noqa: BLE001 - RuntimeError / ValueError, by torch version
        return None


def _float32_inputs(torch, args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args)


class KeepFloat32:
    """For the duration of a `with`: `module.half()` keeps the module float32 (it does `module.float()`, the branch
    PR #24731 kept), and once it has been asked for, the module's forward (and `loss`, when asked) run under autocast.

    Instance attributes shadow the class's methods (nn.Module.__call__ looks `forward` up on the instance) and are
    removed on exit, so nothing stays on the model (keeps torch.compile, pickling and deepcopy untouched afterwards).
    """

    def __init__(self, torch, modules, on_half, on_autocast, *, loss=False):
        self.torch, self.modules, self.on_half, self.on_autocast = torch, modules, on_half, on_autocast
        self.names = ("half", "forward", "loss") if loss else ("half", "forward")
        self.halved, self.autocast, self.saved = False, None, []

    def __enter__(self):
        for module in self.modules:
            for name in self.names:
                self.saved.append((module, name, module.__dict__.get(name, _MISSING)))
            module.__dict__["half"] = self._half(module)
            module.__dict__["forward"] = self._in_autocast(module.forward, "forward")
            if "loss" in self.names and callable(getattr(module, "loss", None)):
                module.__dict__["loss"] = self._in_autocast(module.loss, "loss")
        return self

    def _half(self, module):
        def half():
            if not self.halved:
                self.halved = True
                self.autocast = _autocast_or_none(self.torch, _device_type(module))
                self.on_half(module, self.autocast is not None)
            return module.float()  # a float32 model: no change (ultralytics 8.4.62 `model = model.float()`)
        return half

    def _in_autocast(self, inner, what):
        return lambda *args, **kwargs: self.run(inner, what, args, kwargs)

    def run(self, inner, what, args, kwargs):
        """`inner(*args, **kwargs)`: under autocast once `.half()` was asked for, as it is otherwise."""
        if not self.halved:
            return inner(*args, **kwargs)
        if self.autocast is None:  # no autocast on this device: float32 throughout (float16 inputs are exact)
            return inner(*_float32_inputs(self.torch, args), **kwargs)
        self.on_autocast(what)
        with self.autocast():
            return inner(*args, **kwargs)

    def __exit__(self, *exc):
        for module, name, saved in reversed(self.saved):
            if saved is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = saved
        self.saved = []
        return False


def _models_of(bound, takes_trainer):
    """The modules the validator will cast: ultralytics `trainer.ema.ema or trainer.model` (and a compiled model's
    `_orig_mod`), YOLOv5/YOLOv7 the `model` argument. Empty when not called from training."""
    import torch
    if takes_trainer:
        trainer = bound.arguments.get("trainer")
        if trainer is None:
            return []
        ema = getattr(trainer, "ema", None)
        model = getattr(ema, "ema", None) or getattr(trainer, "model", None)
    else:
        model = bound.arguments.get(MODEL)
    models = [model, getattr(model, "_orig_mod", None)]
    return [m for m in models if isinstance(m, torch.nn.Module)]


def _loss_in_autocast(keep, compute_loss):
    """YOLOv5 / YOLOv7 take the loss as an argument: the same autocast rule around it."""
    def loss_in_autocast(*args, **kwargs):
        return keep.run(compute_loss, "loss", args, kwargs)
    return loss_in_autocast


def replace_validation(original, ctx):
    """The replacement: `validate_in_float32`, which runs the validator without casting the model (see module doc)."""
    import inspect
    from shims.patch import wrap

    filename, halves = read_half_calls(original)
    unwrapped = inspect.unwrap(original)
    takes_trainer = _takes_trainer(unwrapped)
    signature = inspect.signature(unwrapped)
    record, strict = ctx.record, ctx.strict
    if ctx.target.distribution:
        from shims import versions
        record.version = versions.installed(ctx.target.distribution)
    for lineno, text in halves:
        ctx.note(f"{filename}:{lineno}: `{text}` keeps the model float32 (forward and loss under autocast)")

    def on_half(module, autocast):
        record.count("model_half_prevented")
        if not autocast:
            record.note(f"{ctx.target}: no autocast for this device in this torch: validated in float32")

    def on_autocast(what):
        record.count(f"{what}s_autocast" if what == "forward" else "losses_autocast")

    def give_up(reason):
        record.count("validations_unconverted")
        record.note(f"{ctx.target}: a validation ran unpatched: {reason}")
        ctx.logger().warning("yolo: %s ran unpatched (the EMA is cast to float16): %s", ctx.target, reason)
        if strict:
            from shims.errors import ShimsPatchError
            raise ShimsPatchError(f"shims patch 'yolo' could not convert {ctx.target}: {reason} (SHIMS_STRICT=1)")

    def validate_in_float32(wrapped, instance, args, kwargs):
        call_args = ((instance,) + tuple(args)) if instance is not None else tuple(args)
        try:
            import torch
            bound = signature.bind(*call_args, **kwargs)
            models = _models_of(bound, takes_trainer)
            if not models:
                record.count("validations_passed_through")  # not called from training: the model is not the EMA
                return wrapped(*args, **kwargs)
            keep = KeepFloat32(torch, models, on_half, on_autocast, loss=takes_trainer)
            compute_loss = None if takes_trainer else bound.arguments.get("compute_loss")
            if compute_loss is not None:
                bound.arguments["compute_loss"] = _loss_in_autocast(keep, compute_loss)
            before = _state_of(models)
        except Exception as exc:  # noqa: BLE001 - never crash the user's validation
            give_up(f"{type(exc).__name__}: {exc}")
            return wrapped(*args, **kwargs)
        try:
            with torch.no_grad(), keep:
                return unwrapped_call(bound)
        finally:
            # half never asked for (CPU, AMP off): the validation ran exactly as written
            record.count("validations_kept_float32" if keep.halved else "validations_passed_through")
            changed = _changed(before)
            if changed:
                record.note(f"{ctx.target}: the validation changed {len(changed)} model tensor(s) anyway, e.g. "
                            f"{changed[0]} (not a conversion this patch knows)")

    def unwrapped_call(bound):
        return original(*bound.args, **bound.kwargs)  # the decorated original: its own inference_mode stays

    return wrap(original, validate_in_float32)


def detect_half_validation(original, ctx):
    """Observe-only: each validation that casts the EMA with `.half()` is reported once, at the user's line that
    started training and the framework's `.half()` line; nothing is changed."""
    import inspect
    import os
    import sys
    from shims.patch import wrap

    read_half_calls(original)
    unwrapped = inspect.unwrap(original)
    takes_trainer = _takes_trainer(unwrapped)
    signature = inspect.signature(unwrapped)
    own_file = unwrapped.__code__.co_filename
    framework_dir = own_file  # a clone: its train.py, beside val.py / test.py, is the caller to name
    package = sys.modules.get(unwrapped.__module__.split(".")[0])
    if ctx.target.distribution and getattr(package, "__file__", None):  # ultralytics, yolov5: the whole package
        framework_dir = os.path.join(os.path.dirname(package.__file__), "")
    record = ctx.record

    def user_line(frame):
        """The first caller outside the framework, shims, torch and wrapt: the user's `model.train(...)` line."""
        import torch
        skip = (framework_dir, os.path.join(os.path.dirname(torch.__file__), ""))  # shims: by module name below
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(skip) and not frame.f_globals.get("__name__", "").startswith(("wrapt", "shims")):
                return f"{name}:{frame.f_lineno}"
            frame = frame.f_back
        return None

    def validation_observed(wrapped, instance, args, kwargs):
        call_args = ((instance,) + tuple(args)) if instance is not None else tuple(args)
        try:
            bound = signature.bind(*call_args, **kwargs)
            models = _models_of(bound, takes_trainer)
            where = user_line(sys._getframe(1))
        except Exception:  # noqa: BLE001 - observing must never change the call
            models = []
        record.count("validations_observed")
        if not models:
            return wrapped(*args, **kwargs)
        model = models[0]
        seen = []

        def half_observed():
            if not seen:  # once per validation
                caller = sys._getframe(1)
                framework = f"{caller.f_code.co_filename}:{caller.f_lineno}"
                seen.append(framework)
                named = "the trainer's EMA (trainer.ema.ema)" if takes_trainer and \
                    getattr(getattr(bound.arguments.get("trainer"), "ema", None), "ema", None) is model else \
                    "the model passed for validation (train.py passes ema.ema)"
                record.count("half_validations_observed")
                ctx.finding(
                    "yolo-eval-half",
                    f"validation casts {named} ({type(model).__name__}) to float16 in place at {framework} "
                    "`model.half()`, and back with `model.float()`: every validation rounds the live EMA to "
                    "float16 (a weight above 65504 becomes inf and stays inf)",
                    where=where or framework,
                    cost="the EMA, and every checkpoint saved from it, loses precision at each validation; an "
                         "overflowed EMA is never saved (ultralytics #24615)",
                    fix="SHIMS_MODE=fix with the yolo patch (weights stay float32, forward and loss under autocast, "
                        "as ultralytics 8.4.62 does), or upgrade ultralytics to >= 8.4.62")
            return type(model).half(model)

        saved = model.__dict__.get("half", _MISSING)
        model.__dict__["half"] = half_observed
        try:
            return wrapped(*args, **kwargs)
        finally:
            if saved is _MISSING:
                model.__dict__.pop("half", None)
            else:
                model.__dict__["half"] = saved

    return wrap(original, validation_observed)


PATCH = Patch(
    name="yolo",
    summary="validation during training: the EMA stays float32, forward and loss under autocast "
            "(ultralytics < 8.4.62 #24615, YOLOv5 val.run, YOLOv7 test.test)",
    targets=_targets,
    replace=replace_validation,
    detect=detect_half_validation,
    fingerprint=fingerprint,
    distribution=None,  # the ultralytics / yolov5 targets carry their distribution; clones are user code
    torch=">=2.0",  # torch.autocast(device_type) and its per-device default dtype exist throughout
    options=(
        Option("SITES", "sites", default=DEFAULT_SITES,
               help="module:function of YOLOv5/YOLOv7-style validators in a clone (val.py's run, test.py's test)"),
    ),
    docs="docs/patches/yolo.md",
    upstream="ultralytics/ultralytics#24615, PR #24731 (fixed in 8.4.62); YOLOv5 and YOLOv7: no fix",
)
