"""detr: run `fp16_eval` evaluation under autocast and no_grad instead of converting the model with `model.half()`.

Target   `rfdetr.engine.evaluate` (and the copy `rfdetr.main` binds with `from rfdetr.engine import evaluate`) for
         rfdetr < 1.6, and LW-DETR-style `evaluate` functions in user code: the modules named by SHIMS_DETR_MODULES
         (default `engine`, the LW-DETR layout) and the functions named by SHIMS_DETR_FUNCTIONS (default `evaluate`).
Bug      `if args.fp16_eval: model.half()` converts the live training model (and, in rfdetr.main, the EMA copy) to
         float16 and never converts it back; inputs are cast with `.half()`, so every layer, LayerNorm and softmax
         included, runs in float16; rfdetr's evaluate also builds an autograd graph (no `no_grad`) (rf-detr #117).
Upstream from rfdetr 1.6 training runs on PyTorch Lightning and `fp16_eval` has no effect; PR #1471 deprecates it.
         There the patch says "fixed upstream". LW-DETR (Atten4Vis/LW-DETR, engine.py) still has the block.
The patch: `evaluate_without_half` (built by `replace_evaluate`) calls the original evaluate with a shallow copy of
         `args` whose `fp16_eval` is False, so the `.half()` block never runs, inside `torch.no_grad()`; the model's
         forward runs under autocast (float16 on CUDA; float32, i.e. no autocast, elsewhere: SHIMS_DETR_DTYPE) and its
         outputs are cast to float32 before the criterion and postprocessors see them. Parameters and buffers keep
         their dtype, device, values and requires_grad. Only functions whose source has the `fp16_eval` -> `.half()`
         shape (checked by `read_fp16_eval_shape`) are wrapped. Docs: docs/patches/detr.md.
"""

from shims.patch import Option, Patch, Skip, Target, function_def

RFDETR_FIXED_IN = "1.6"  # Lightning training: fp16_eval has no effect (deprecated by rf-detr PR #1471)
# below 1.6 the function's shape decides (read_fp16_eval_shape); checked in the 1.4.3 and 1.5.2 wheels
RFDETR_TARGETS = (Target("rfdetr.engine", "evaluate", distribution="rfdetr"),
                  Target("rfdetr.main", "evaluate", distribution="rfdetr"))
FLAG = "fp16_eval"
DTYPES = ("auto", "float16", "bfloat16", "float32")
GRAD_MODES = ("no_grad", "inference_mode")


def _targets(options):
    user = tuple(Target(m, f) for m in options["MODULES"] for f in options["FUNCTIONS"])
    return RFDETR_TARGETS + tuple(t for t in user if t not in RFDETR_TARGETS)


# ---------------------------------------------------------------- reading the function


class Fp16EvalShape:
    """What `read_fp16_eval_shape` found: the parameter holding the flag, the parameters converted with `.half()`,
    and every conversion line (for the receipt)."""

    __slots__ = ("filename", "flag_param", "model_params", "conversions", "def_line")

    def __init__(self, filename, flag_param, model_params, conversions, def_line):
        self.filename, self.flag_param, self.model_params = filename, flag_param, model_params
        self.conversions, self.def_line = conversions, def_line

    def where(self, lineno):
        return f"{self.filename}:{lineno}"


def _flag_holder(test):
    """The name whose `fp16_eval` an `if` test reads (`args.fp16_eval` or `getattr(args, "fp16_eval", ...)`)."""
    import ast
    if isinstance(test, ast.Attribute) and test.attr == FLAG and isinstance(test.value, ast.Name):
        return test.value.id
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "getattr"
            and len(test.args) >= 2 and isinstance(test.args[0], ast.Name)
            and isinstance(test.args[1], ast.Constant) and test.args[1].value == FLAG):
        return test.args[0].id
    return None


def _conversion_call(node):
    """(method, receiver node) when `node` is `X.half()` or `X.float()` with no arguments, else None."""
    import ast
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("half", "float")
            and not node.args and not node.keywords):
        return node.func.attr, node.func.value
    return None


def _check_block(statements, params, found):
    """Walk an fp16_eval block; only dtype conversions (and loops / ifs around them) may be in it.

    Appends (lineno, method, receiver parameter or None, text) to `found`; returns a refusal reason or None.
    """
    import ast
    for stmt in statements:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, (ast.For, ast.If)):
            reason = _check_block(stmt.body + stmt.orelse, params, found)
            if reason:
                return reason
            continue
        value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
        conversion = _conversion_call(value) if value is not None else None
        if conversion is None:
            return f"line {stmt.lineno} in the fp16_eval block is not a dtype conversion: `{ast.unparse(stmt)}`"
        method, receiver = conversion
        receiver_param = receiver.id if isinstance(receiver, ast.Name) and receiver.id in params else None
        found.append((stmt.lineno, method, receiver_param, ast.unparse(stmt)))
    return None


def read_fp16_eval_shape(func):
    """The `Fp16EvalShape` of `func`; raises Skip when it does not have exactly the fp16_eval -> `.half()` shape.

    Accepted: one parameter (e.g. `args`) whose `fp16_eval` is read only as the test of `if` blocks without `else`;
    the blocks hold only `.half()` / `.float()` conversions; at least one converts a parameter (the model) in place.
    """
    import ast

    unwrapped, node, params = function_def(func)  # LW-DETR decorates evaluate with @torch.no_grad()
    filename = unwrapped.__code__.co_filename

    flag_tests, flag_holders, conversions = set(), set(), []
    for sub in ast.walk(node):
        if isinstance(sub, ast.If) and _flag_holder(sub.test) is not None:
            holder = _flag_holder(sub.test)
            flag_tests.add(id(sub.test))
            flag_tests.update(id(n) for n in ast.walk(sub.test))
            flag_holders.add(holder)
            if sub.orelse:
                raise Skip(f"{filename}:{sub.lineno}: the fp16_eval `if` has an `else` branch, which turning the flag "
                           "off would run")
            reason = _check_block(sub.body, params, conversions)
            if reason:
                raise Skip(f"{filename}: {reason}")
    if not flag_holders:
        raise Skip(f"{unwrapped.__qualname__} has no `if <args>.fp16_eval:` block: it never converts the model "
                   "(DETR / Deformable-DETR / RT-DETR style): nothing to fix", status="skipped-benign")
    for sub in ast.walk(node):  # any other read of the flag would change meaning when we turn it off
        is_read = (isinstance(sub, ast.Attribute) and sub.attr == FLAG) or (
            isinstance(sub, ast.Constant) and sub.value == FLAG)
        if is_read and id(sub) not in flag_tests:
            raise Skip(f"{filename}:{sub.lineno}: fp16_eval is read outside an `if` test; turning it off would "
                       "change more than the dtype conversion")
    if len(flag_holders) != 1 or next(iter(flag_holders)) not in params:
        raise Skip(f"fp16_eval is read from {sorted(flag_holders)}, not from one parameter of "
                   f"{unwrapped.__qualname__} ({sorted(params)})")
    models = tuple(dict.fromkeys(p for _, method, p, _ in conversions if method == "half" and p is not None))
    if not models:
        raise Skip(f"{filename}: the fp16_eval blocks convert no parameter of {unwrapped.__qualname__} with "
                   "`.half()` (expected `model.half()`)")
    return Fp16EvalShape(filename, next(iter(flag_holders)), models, tuple(conversions), node.lineno)


def fingerprint(func):
    """None when `func` has the fp16_eval -> `.half()` shape; raises Skip with the reason otherwise.
    (rfdetr >= 1.6 never gets here: the engine's version check on the rfdetr targets says "fixed upstream".)"""
    read_fp16_eval_shape(func)  # raises Skip with the reason


# ---------------------------------------------------------------- running the evaluation


_MISSING = object()


def outputs_to_float32(value):
    """float16 / bfloat16 tensors in `value` (dicts and lists changed in place, tuples rebuilt) as float32."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, dict):
        for key in list(value):
            value[key] = outputs_to_float32(value[key])
        return value
    if isinstance(value, list):
        value[:] = [outputs_to_float32(v) for v in value]
        return value
    if isinstance(value, tuple):
        items = [outputs_to_float32(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _first_tensor(module):
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
    return None


def choose_autocast(models, device_arg, choice):
    """(device type, torch dtype or None for no autocast) for option value `choice` (see SHIMS_DETR_DTYPE)."""
    import torch
    tensor = next((t for t in (_first_tensor(m) for m in models) if t is not None), None)
    device_type = tensor.device.type if tensor is not None else torch.device(device_arg or "cpu").type
    if choice == "auto":
        # float16 where fp16_eval was meant to help (CUDA); on CPU autocast is slower and less exact (docs/patches)
        return device_type, (torch.float16 if device_type == "cuda" else None)
    return device_type, (None if choice == "float32" else getattr(torch, choice))


def _state_of(models):
    """Per tensor of each model: (name, tensor, dtype, device, requires_grad, version, data pointer)."""
    state = []
    for index, model in enumerate(models):
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            state.append((f"model[{index}].{name}", tensor, tensor.dtype, tensor.device, tensor.requires_grad,
                          tensor._version, tensor.data_ptr()))
    return state


def _changed(before):
    """Names of the tensors whose dtype, device, requires_grad, version or storage differ from `before`."""
    return [entry[0] for entry in before
            if (entry[1].dtype, entry[1].device, entry[1].requires_grad, entry[1]._version, entry[1].data_ptr())
            != entry[2:]]


class _ForwardInAutocast:
    """For the duration of a `with`: the modules' forward runs under autocast and returns float32 outputs.

    An instance attribute `forward` shadows the class's method (nn.Module.__call__ looks it up on the instance); it
    is removed on exit, so nothing stays on the model (keeps torch.compile and pickling untouched afterwards).
    """

    def __init__(self, modules, device_type, dtype, on_forward):
        self.modules, self.device_type, self.dtype, self.on_forward = modules, device_type, dtype, on_forward
        self.saved = []

    def __enter__(self):
        import torch
        for module in self.modules:
            self.saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.__dict__["forward"] = self._in_autocast(module.forward, torch)
        return self

    def _in_autocast(self, inner, torch):
        def forward_in_autocast(*args, **kwargs):
            with torch.autocast(self.device_type, dtype=self.dtype):
                outputs = inner(*args, **kwargs)
            self.on_forward()
            return outputs_to_float32(outputs)
        return forward_in_autocast

    def __exit__(self, *exc):
        for module, saved in reversed(self.saved):
            if saved is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = saved
        self.saved = []
        return False


def _flag_off_copy(holder):
    """A shallow copy of `holder` with fp16_eval False; the caller's object is never modified."""
    import copy
    clone = copy.copy(holder)
    if clone is holder:
        raise TypeError(f"copy.copy({type(holder).__name__}) returned the same object")
    try:
        setattr(clone, FLAG, False)
    except AttributeError as exc:  # Python 3.9's "can't set attribute" does not name the class: say which
        raise AttributeError(f"cannot set {type(holder).__name__}.{FLAG} on a copy: {exc}") from None
    if getattr(clone, FLAG) is not False or not getattr(holder, FLAG):
        raise TypeError(f"{type(holder).__name__} did not keep fp16_eval=False on its copy")
    return clone


def replace_evaluate(original, ctx):
    """The replacement: `evaluate_without_half`, which runs a fp16_eval evaluation without `.half()` (see module doc)."""
    import inspect
    from shims.patch import wrap

    shape = read_fp16_eval_shape(original)
    if ctx.target.module.startswith("rfdetr"):
        from shims import versions
        ctx.version(versions.installed("rfdetr"))
    signature = inspect.signature(original)
    dtype_choice, grad_mode, strict = ctx.options["DTYPE"], ctx.options["GRAD_MODE"], ctx.strict
    for lineno, method, _, text in shape.conversions:
        if method == "half":
            ctx.note(f"{shape.where(lineno)}: `{text}` does not run when fp16_eval is set")

    def count_forward():
        ctx.count("forwards_autocast")

    def give_up(reason):
        """The evaluation runs as written (the bug stays); the receipt says why. Strict mode raises instead."""
        ctx.count("evaluations_unconverted")
        ctx.note(f"an evaluation ran unpatched: {reason}")
        ctx.logger().warning("detr: %s ran unpatched (fp16_eval will convert the model to half): %s",
                             ctx.target, reason)
        if strict:
            from shims.errors import ShimsPatchError
            raise ShimsPatchError(f"shims patch 'detr' could not convert {ctx.target}: {reason} (SHIMS_STRICT=1)")

    def evaluate_without_half(wrapped, instance, args, kwargs):
        if instance is not None:  # a method: the original takes its instance first
            args = (instance,) + tuple(args)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let the original report the bad call in its own words
        holder = bound.arguments.get(shape.flag_param)
        if holder is None or not getattr(holder, FLAG, False):
            ctx.count("evaluations_passed_through")
            return original(*args, **kwargs)
        try:
            import torch
            models = [bound.arguments.get(p) for p in shape.model_params]
            models = [m for m in models if isinstance(m, torch.nn.Module)]
            if not models:
                raise TypeError(f"no torch.nn.Module passed as {', '.join(shape.model_params)}")
            bound.arguments[shape.flag_param] = _flag_off_copy(holder)
            device_type, dtype = choose_autocast(models, bound.arguments.get("device"), dtype_choice)
            before = _state_of(models)
            grad_off = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
            forward = _ForwardInAutocast(models, device_type, dtype, count_forward) if dtype is not None else None
        except Exception as exc:  # noqa: BLE001 - never crash the user's evaluation
            give_up(f"{type(exc).__name__}: {exc}")
            return original(*args, **kwargs)
        ctx.count("evaluations_converted")
        ctx.count("model_half_prevented", len(models))
        try:
            with grad_off:
                if forward is None:
                    return original(*bound.args, **bound.kwargs)
                with forward:
                    return original(*bound.args, **bound.kwargs)
        finally:
            changed = _changed(before)
            if changed:
                ctx.note(f"the evaluation changed {len(changed)} model tensor(s) anyway, e.g. "
                            f"{changed[0]} (not a conversion this patch knows)")

    return wrap(original, evaluate_without_half)


def detect_half_conversion(original, ctx):
    """Observe-only: each evaluation with fp16_eval set is reported at its call site; nothing is changed."""
    import inspect
    import sys
    from shims.patch import wrap

    shape = read_fp16_eval_shape(original)
    signature = inspect.signature(original)
    half_lines = ", ".join(f"{shape.where(n)} `{t}`" for n, m, _, t in shape.conversions if m == "half")

    def evaluate_observed(wrapped, instance, args, kwargs):
        if instance is not None:
            args = (instance,) + tuple(args)
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("wrapt."):
            frame = frame.f_back  # wrapt's pure-Python wrappers (C extension off) add frames
        call_site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        del frame
        try:
            bound = signature.bind(*args, **kwargs)
            holder = bound.arguments.get(shape.flag_param)
            flagged = holder is not None and bool(getattr(holder, FLAG, False))
        except Exception:  # noqa: BLE001 - observing must never change the call
            flagged = False
        ctx.count("evaluations_observed")
        if flagged:  # reported before the call: an evaluation that fails in float16 is reported all the same
            ctx.count("fp16_evaluations_observed")
            ctx.finding(
                "fp16-eval-half",
                f"{original.__qualname__} is called with fp16_eval=True: its fp16_eval block ({half_lines}) converts "
                "the model to float16 and never converts it back (the training model, its EMA copy and later "
                "checkpoints stay half; LayerNorm and softmax run in float16)",
                where=call_site, cost="a permanently float16 model after the first evaluation (rf-detr #117)",
                fix="SHIMS_MODE=fix with the detr patch: autocast + no_grad, the model stays float32")
        return original(*args, **kwargs)

    return wrap(original, evaluate_observed)


PATCH = Patch(
    name="detr",
    summary="fp16_eval evaluation: autocast + no_grad instead of model.half() (rfdetr < 1.6 #117, LW-DETR)",
    targets=_targets,
    replace=replace_evaluate,
    detect=detect_half_conversion,
    fingerprint=fingerprint,
    distribution=None,  # rfdetr's targets carry distribution="rfdetr"; user LW-DETR code has no version
    fixed_in=RFDETR_FIXED_IN,
    torch=">=2.0",  # torch.autocast(device_type=...) and no_grad / inference_mode exist throughout
    options=(
        Option("MODULES", "list", default=("engine",),
               help="user modules whose evaluate has the LW-DETR fp16_eval block (rfdetr's are always targets)"),
        Option("FUNCTIONS", "list", default=("evaluate",), help="function names to look for in MODULES"),
        Option("DTYPE", "choice", default="auto", choices=DTYPES,
               help="autocast dtype of the forward: auto = float16 on CUDA, none (float32) elsewhere"),
        Option("GRAD_MODE", "choice", default="no_grad", choices=GRAD_MODES,
               help="how gradients are turned off during the evaluation"),
    ),
    docs="docs/patches/detr.md",
    upstream="roboflow/rf-detr#117, PR #1471 (fp16_eval deprecated; no effect from rfdetr 1.6)",
)
