"""detr patch: a fp16_eval evaluation leaves the model as it was and matches a float32 evaluation.

Two subjects, the same assertions:
- an LW-DETR-style `evaluate` written here (tests/detr_reference.py: no_grad decorated, the fp16_eval `.half()`
  block, no autocast) on a timm mobilevit_xxs detector (BatchNorm and LayerNorm);
- the real `rfdetr.engine.evaluate` of rfdetr 1.5.2 on RF-DETR Nano (pretrain_weights=None) with a COCO dataset
  written by the test.
Unpatched, each test first shows the bug (parameters float16 afterwards, the optimizer's parameters with them;
rfdetr also builds an autograd graph). Patched on CPU (SHIMS_DETR_DTYPE=auto: no autocast), the outputs are bitwise
those of a float32 evaluation, parameters and buffers are bitwise unchanged, and the next training step is bitwise
the step of a run that never evaluated. With SHIMS_DETR_DTYPE=float16 (autocast on CPU) the outputs differ from
float32 by more than zero (autocast ran) and by at most the first-order float16 bound of the model's own forward
(`float16_autocast_bound`: unit roundoff x the longest chain of float16 roundings x the outputs' magnitude).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys

import pytest
import torch

import shims
from conftest import clean_env, run_python, write
from shims.errors import ShimsConfigError, ShimsPatchError

REFERENCE = "tests.detr_reference"
ref = importlib.import_module(REFERENCE)

# What float16 autocast can change, derived (first-order forward error analysis), never a CPU's measured rounding:
# - every op that writes a float16 result rounds it once: relative error <= u = 2^-11 (float16 unit roundoff); a cast
#   of a float32 input or weight to float16 is such an op;
# - a reduction over N products (conv, addmm, attention, norms) accumulated in float32 adds <= N * 2^-24; the widest
#   reduction of these models (checked below) is under 2^11 terms, so that is < u and each op contributes < 2u;
# - errors along a chain of ops whose relative condition is about 1 (activations normalised by BatchNorm/LayerNorm,
#   as in both models) add to first order, so an output differs from float32 by at most
#       2u x (float16 roundings on the longest chain from input to output) x max |float32 output|.
# The chain length and the widest reduction are counted on the model's own autocast forward (FLOAT16_ROUNDINGS).
FLOAT16_UNIT_ROUNDOFF = 2.0 ** -11
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def float16_autocast_bound(model, inputs, float32_outputs):
    """The bound above for `model` run on each of `inputs` under CPU float16 autocast, against its float32 outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Roundings(TorchDispatchMode):
        """Per tensor, the float16 roundings on the longest chain that produced it (kept as a tensor attribute)."""

        longest, widest = 0, 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
            outs = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
            depth = max([getattr(t, "_float16_roundings", 0) for t in ins], default=0)
            storage = {t.data_ptr() for t in ins}
            if any(t.dtype == torch.float16 and t.data_ptr() not in storage for t in outs):  # views round nothing
                depth += 1
                name = str(func)
                if "convolution" in name:
                    Roundings.widest = max(Roundings.widest, args[1][0].numel())  # in_channels/groups x kernel
                elif "mm" in name or "attention" in name:
                    Roundings.widest = max(Roundings.widest, *(t.shape[-1] for t in ins if t.dim() >= 2))
            for t in outs:
                t._float16_roundings = depth
            Roundings.longest = max(Roundings.longest, depth)
            return out

    model = copy.deepcopy(model).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), Roundings():
        for batch in inputs:
            model(batch)
    assert Roundings.widest * FLOAT32_UNIT_ROUNDOFF < FLOAT16_UNIT_ROUNDOFF, Roundings.widest  # the 2u per op above
    scale = max(t.abs().max().item() for batch in float32_outputs for t in batch)
    return 2 * FLOAT16_UNIT_ROUNDOFF * Roundings.longest * scale


def cpu_float16_missing():
    """Why float16 kernels of these models (conv2d, addmm, layer_norm) do not run on this CPU build, or None.
    torch before about 2.3 has none of them on the CPU ("... not implemented for 'Half'")."""
    half = torch.float16
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=half), torch.ones(1, 1, 1, 1, dtype=half))
        torch.nn.functional.linear(torch.ones(2, 2, dtype=half), torch.ones(2, 2, dtype=half))
        torch.nn.functional.layer_norm(torch.ones(2, 4, dtype=half), (4,))
    except RuntimeError as exc:
        return f"torch {torch.__version__} has no CPU float16 kernel: {exc}"
    return None


def no_half_kernel(exc):
    """Whether `exc` says a float16 kernel is missing on this CPU build (the wording varies by kernel)."""
    return re.search(r"not implemented for '?Half'?", str(exc)) is not None


def run_unpatched_half_evaluation(model, evaluate):
    """Run an unpatched fp16_eval evaluation with the model's outputs recorded: (recorder, None), or (recorder, why it
    could not run) when, after model.half(), a float16 kernel this CPU build lacks stopped it."""
    recorder, failed = OutputRecorder(model), None
    try:
        evaluate()
    except RuntimeError as exc:
        if not no_half_kernel(exc):
            raise
        failed = f"the unpatched .half() evaluation cannot run here: torch {torch.__version__} on the CPU: {exc}"
    finally:
        recorder.remove()
    return recorder, failed


def cpu_autocast_float16_missing():
    """Why CPU autocast cannot run these models in float16 on this torch, or None (bfloat16-only before ~2.2; then
    without float16 LayerNorm before ~2.3)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch 2.0 warns "Disabling autocast" before it raises
            with torch.autocast("cpu", dtype=torch.float16):
                x = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(2, 1, 1, 1)).flatten(1)
                x = torch.nn.functional.linear(x, torch.ones(4, 18))
                torch.nn.functional.layer_norm(x, (4,))
        if x.dtype != torch.float16:
            return f"torch {torch.__version__}: CPU autocast does not compute in float16"
    except (RuntimeError, UserWarning) as exc:
        return f"torch {torch.__version__} cannot run these models under float16 CPU autocast: {exc}"
    return None


CPU_AUTOCAST_FLOAT16_MISSING = cpu_autocast_float16_missing()
# a reduced-precision autocast dtype this CPU runs, for tests whose point is not float16 itself
CPU_AUTOCAST_DTYPE = "bfloat16" if CPU_AUTOCAST_FLOAT16_MISSING else "float16"


class Args:
    """What argparse gives LW-DETR's and RF-DETR's evaluate: attributes, fp16_eval among them."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def enable_detr(modules=(REFERENCE,), **options):
    values = {"SHIMS_DETR_MODULES": ",".join(modules)}
    values.update({f"SHIMS_DETR_{k.upper()}": v for k, v in options.items()})
    return shims.enable(patches=["detr"], options=values)


def detr_record():
    return shims.status()["patches"]["detr"]


def leaves(value):
    """Every tensor in a nested dict / list / tuple, in a stable order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in leaves(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in leaves(item)]
    return []


class OutputRecorder:
    """Forward hook: a copy of every output tensor of each forward, and whether any carries an autograd graph."""

    def __init__(self, module):
        self.batches, self.graph_built = [], False
        self.handle = module.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        tensors = leaves(output)
        self.graph_built |= any(t.grad_fn is not None for t in tensors)
        self.batches.append([t.detach().clone() for t in tensors])

    def remove(self):
        self.handle.remove()


def max_deviation(batches, reference):
    assert len(batches) == len(reference) and len(batches) > 0
    worst = 0.0
    for got, want in zip(batches, reference):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            worst = max(worst, (a.float() - b).abs().max().item())
    return worst


def state_copy(module):
    return {name: (t.detach().clone(), t.requires_grad)
            for name, t in list(module.named_parameters()) + list(module.named_buffers())}


def assert_state_unchanged(module, before):
    now = state_copy(module)
    assert now.keys() == before.keys()
    for name, (tensor, requires_grad) in before.items():
        current, current_requires_grad = now[name]
        assert current.dtype == tensor.dtype, f"{name}: {tensor.dtype} became {current.dtype}"
        assert current.device == tensor.device, name
        assert current_requires_grad == requires_grad, name
        assert torch.equal(current, tensor), f"{name} changed value"


def optimizer_state_copy(optimizer):
    return [(name, t.detach().clone()) for state in optimizer.state.values() for name, t in sorted(state.items())
            if torch.is_tensor(t)]


def assert_optimizer_unchanged(optimizer, before):
    now = optimizer_state_copy(optimizer)
    assert [n for n, _ in now] == [n for n, _ in before]
    for (name, current), (_, saved) in zip(now, before):
        assert current.dtype == saved.dtype and torch.equal(current, saved), name
    assert all(p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"])


def assert_same_parameters(a, b):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differs"


# ---------------------------------------------------------------- the reference (timm) subject


@pytest.fixture(scope="module")
def reference_setup():
    """A warmed-up timm detector (one AdamW step: BatchNorm statistics and optimizer state are not trivial)."""
    torch.manual_seed(0)
    dataset = ref.synthetic_annotations()
    batches = ref.reference_batches(dataset)
    model = ref.TimmDetector()
    criterion = ref.FirstQueryCriterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref.train_step(model, criterion, optimizer, *batches[0])
    coco = ref.coco_from_dict(dataset)
    float32 = copy.deepcopy(model)
    recorder = OutputRecorder(float32)
    ref.evaluate(float32, ref.FirstQueryCriterion(), {"bbox": ref.BoxPostProcess()}, batches, coco, "cpu",
                 Args(fp16_eval=False))
    recorder.remove()
    return {"model": model, "optimizer": optimizer, "batches": batches, "coco": coco,
            "float32_outputs": recorder.batches}


def fresh_reference(setup):
    """A copy of the warmed-up model with its own optimizer carrying a copy of the optimizer state."""
    model = copy.deepcopy(setup["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(copy.deepcopy(setup["optimizer"].state_dict()))
    return model, optimizer


def run_reference(setup, model, fp16_eval=True, module=None):
    """evaluate(...) as looked up on the module now (patched or not); returns (stats, recorder, criterion, post)."""
    module = module or importlib.import_module(REFERENCE)
    criterion, post = ref.FirstQueryCriterion(), ref.BoxPostProcess()
    recorder = OutputRecorder(model)
    try:
        stats, _ = module.evaluate(model, criterion, {"bbox": post}, setup["batches"], setup["coco"], "cpu",
                                   Args(fp16_eval=fp16_eval))
    finally:
        recorder.remove()
    return stats, recorder, criterion, post


def test_reference_shape_is_recognised():
    from shims.patches import detr
    shape = detr.read_fp16_eval_shape(ref.evaluate)
    assert shape.flag_param == "args" and shape.model_params == ("model",)
    halves = [text for _, method, _, text in shape.conversions if method == "half"]
    assert halves == ["model.half()", "images = images.half()"]


@pytest.fixture(scope="module")
def reference_unpatched(reference_setup):
    """The unpatched fp16_eval evaluation: (model, optimizer, output recorder, why its forward failed or None).
    Where the CPU has no float16 kernels the forward raises, after `model.half()` has already converted the model."""
    model, optimizer = fresh_reference(reference_setup)
    recorder, failed = run_unpatched_half_evaluation(model, lambda: ref.evaluate(
        model, ref.FirstQueryCriterion(), {"bbox": ref.BoxPostProcess()}, reference_setup["batches"],
        reference_setup["coco"], "cpu", Args(fp16_eval=True)))
    return model, optimizer, recorder, failed


def test_reference_unpatched_converts_model_to_half(reference_unpatched):
    model, optimizer, _, _ = reference_unpatched
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.backbone.stem.bn.running_var.dtype == torch.float16  # BatchNorm statistics too
    assert optimizer.param_groups[0]["params"][0].dtype == torch.float16  # what the next step would update


def test_reference_unpatched_half_outputs_deviate_from_float32(reference_setup, reference_unpatched):
    _, _, recorder, failed = reference_unpatched
    if failed:
        pytest.skip(failed)  # the patched path is checked for float16 kernels by the next test instead
    assert max_deviation(recorder.batches, reference_setup["float32_outputs"]) > 0


def test_reference_patched_path_runs_no_float16_kernel(reference_setup):
    """On the CPU (SHIMS_DETR_DTYPE=auto) the patched evaluation never computes in float16, so it runs on torches
    without CPU float16 kernels: every floating tensor into and out of every module is float32."""
    model, _ = fresh_reference(reference_setup)
    seen = set()

    def record(module, inputs, output):
        seen.update(t.dtype for t in leaves(list(inputs)) + leaves(output) if t.is_floating_point())
        seen.update(p.dtype for p in module.parameters(recurse=False))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    enable_detr()
    try:
        stats, _, _, _ = run_reference(reference_setup, model)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {torch.float32}
    assert len(stats["coco_eval_bbox"]) == 12
    assert detr_record()["counters"]["model_half_prevented"] == 1


def test_reference_patched_keeps_model_and_matches_float32(reference_setup):
    model, optimizer = fresh_reference(reference_setup)
    ema = copy.deepcopy(model)
    before, ema_before, opt_before = state_copy(model), state_copy(ema), optimizer_state_copy(optimizer)
    enable_detr()
    assert detr_record()["targets"][f"{REFERENCE}:evaluate"]["status"] == "applied"
    stats, recorder, criterion, post = run_reference(reference_setup, model)
    ema_stats, _, _, _ = run_reference(reference_setup, ema)  # rfdetr.main evaluates the EMA copy too
    assert_state_unchanged(model, before)
    assert_state_unchanged(ema, ema_before)
    assert_optimizer_unchanged(optimizer, opt_before)
    assert max_deviation(recorder.batches, reference_setup["float32_outputs"]) == 0.0  # bitwise on CPU
    assert not recorder.graph_built
    assert criterion.seen_dtypes == {torch.float32} and post.seen_dtypes == {torch.float32}
    assert len(stats["coco_eval_bbox"]) == 12 and stats == ema_stats
    record = detr_record()
    assert record["counters"]["evaluations_converted"] == 2
    assert record["counters"]["model_half_prevented"] == 2
    assert any("model.half()" in note and "detr_reference.py:" in note for note in record["notes"])


def test_reference_training_continues_as_if_never_evaluated(reference_setup):
    evaluated, evaluated_opt = fresh_reference(reference_setup)
    untouched, untouched_opt = fresh_reference(reference_setup)
    enable_detr()
    run_reference(reference_setup, evaluated)
    images, targets = reference_setup["batches"][1]
    loss_a = ref.train_step(evaluated, ref.FirstQueryCriterion(), evaluated_opt, images, targets, seed=3)
    loss_b = ref.train_step(untouched, ref.FirstQueryCriterion(), untouched_opt, images, targets, seed=3)
    assert torch.equal(loss_a, loss_b)
    assert_same_parameters(evaluated, untouched)


@pytest.mark.skipif(CPU_AUTOCAST_FLOAT16_MISSING is not None, reason=str(CPU_AUTOCAST_FLOAT16_MISSING))
def test_reference_float16_autocast_within_tolerance(reference_setup):
    model, _ = fresh_reference(reference_setup)
    bound = float16_autocast_bound(model, [images for images, _ in reference_setup["batches"]],
                                   reference_setup["float32_outputs"])
    before = state_copy(model)
    enable_detr(dtype="float16")
    _, recorder, criterion, post = run_reference(reference_setup, model)
    deviation = max_deviation(recorder.batches, reference_setup["float32_outputs"])
    assert_state_unchanged(model, before)
    assert 0 < deviation <= bound, (deviation, bound)  # > 0: the forward really ran in float16 autocast
    assert criterion.seen_dtypes == {torch.float32} and post.seen_dtypes == {torch.float32}
    assert detr_record()["counters"]["forwards_autocast"] == len(reference_setup["batches"])


def test_reference_without_fp16_eval_is_passed_through(reference_setup):
    model, _ = fresh_reference(reference_setup)
    enable_detr()
    _, recorder, _, _ = run_reference(reference_setup, model, fp16_eval=False)
    assert max_deviation(recorder.batches, reference_setup["float32_outputs"]) == 0.0
    counters = detr_record()["counters"]
    assert counters == {"evaluations_passed_through": 1}


def test_reference_detect_mode_reports_call_site_and_changes_nothing(reference_setup):
    model, _ = fresh_reference(reference_setup)
    shims.enable(patches=["detr"], mode="detect", options={"SHIMS_DETR_MODULES": REFERENCE})
    module = importlib.import_module(REFERENCE)
    try:
        call_line = sys._getframe().f_lineno + 1
        module.evaluate(model, ref.FirstQueryCriterion(), {"bbox": ref.BoxPostProcess()}, reference_setup["batches"],
                        reference_setup["coco"], "cpu", Args(fp16_eval=True))
    except RuntimeError as exc:  # observe-only: without CPU float16 kernels it fails exactly as unpatched does
        assert no_half_kernel(exc) and cpu_float16_missing(), exc
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # observe-only: the bug still happens
    (finding,) = detr_record()["findings"]
    assert finding["kind"] == "fp16-eval-half"
    assert finding["where"] == f"{__file__}:{call_line}"
    assert "detr_reference.py:" in finding["message"] and "model.half()" in finding["message"]


def test_unconvertible_args_run_unpatched_or_raise_in_strict(reference_setup):
    class FrozenArgs:
        fp16_eval = property(lambda self: True)  # a copy cannot turn it off

    model, _ = fresh_reference(reference_setup)
    enable_detr()
    module = importlib.import_module(REFERENCE)
    try:
        stats, _ = module.evaluate(model, ref.FirstQueryCriterion(), {"bbox": ref.BoxPostProcess()},
                                   reference_setup["batches"], reference_setup["coco"], "cpu", FrozenArgs())
        assert len(stats["coco_eval_bbox"]) == 12  # the user's evaluation still ran
    except RuntimeError as exc:  # it ran unpatched: in float16, which this CPU build cannot compute
        assert no_half_kernel(exc) and cpu_float16_missing(), exc
        assert {p.dtype for p in model.parameters()} == {torch.float16}
    record = detr_record()
    assert record["counters"]["evaluations_unconverted"] == 1
    assert any("ran unpatched" in note and "FrozenArgs" in note for note in record["notes"])
    shims.disable()
    shims.enable(patches=["detr"], strict=True, options={"SHIMS_DETR_MODULES": REFERENCE})
    with pytest.raises(ShimsPatchError, match="could not convert"):
        module.evaluate(fresh_reference(reference_setup)[0], ref.FirstQueryCriterion(),
                        {"bbox": ref.BoxPostProcess()}, reference_setup["batches"], reference_setup["coco"], "cpu",
                        FrozenArgs())


# ---------------------------------------------------------------- fingerprint and configuration (no model)


SHAPES = {
    "no_flag": ("""
        import torch
        @torch.no_grad()
        def evaluate(model, data, args):
            model.eval()
            return [model(x) for x in data]
        """, "skipped", False, "nothing to fix"),
    "extra_statement": ("""
        def evaluate(model, data, args):
            if args.fp16_eval:
                model.half()
                print("half")
            return [model(x) for x in data]
        """, "skipped", True, "not a dtype conversion"),
    "else_branch": ("""
        def evaluate(model, data, args):
            if args.fp16_eval:
                model.half()
            else:
                model.float()
            return [model(x) for x in data]
        """, "skipped", True, "else"),
    "flag_read_elsewhere": ("""
        def evaluate(model, data, args):
            if args.fp16_eval:
                model.half()
            use_half = args.fp16_eval
            return [model(x) for x in data]
        """, "skipped", True, "outside an `if` test"),
    "flag_from_global": ("""
        ARGS = None
        def evaluate(model, data):
            if ARGS.fp16_eval:
                model.half()
            return [model(x) for x in data]
        """, "skipped", True, "not from one parameter"),
    "half_of_a_global": ("""
        MODEL = None
        def evaluate(data, args):
            if args.fp16_eval:
                MODEL.half()
            return [MODEL(x) for x in data]
        """, "skipped", True, "convert no parameter"),
    "getattr_flag": ("""
        def evaluate(model, data, args):
            if getattr(args, "fp16_eval", False):
                model.half()
            return [model(x) for x in data]
        """, "applied", False, ""),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fingerprint_wraps_only_the_fp16_eval_half_shape(shape, tmp_path, monkeypatch):
    source, status, strict_raises, reason = SHAPES[shape]
    name = f"detr_shape_{shape}"
    write(tmp_path / f"{name}.py", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    original = module.evaluate
    try:
        enable_detr(modules=(name,))
        target = detr_record()["targets"][f"{name}:evaluate"]
        assert target["status"] == status and reason in target["reason"], target
        assert (module.evaluate is original) == (status != "applied")
        shims.disable()
        assert module.evaluate is original
        if strict_raises:
            with pytest.raises(ShimsPatchError, match="could not apply"):
                shims.enable(patches=["detr"], strict=True, options={"SHIMS_DETR_MODULES": name})
        else:
            shims.enable(patches=["detr"], strict=True, options={"SHIMS_DETR_MODULES": name})
    finally:
        sys.modules.pop(name, None)


def test_bad_dtype_option_names_the_valid_choices():
    with pytest.raises(ShimsConfigError, match="SHIMS_DETR_DTYPE='float8'.*auto, float16, bfloat16, float32"):
        shims.enable(patches=["detr"], options={"SHIMS_DETR_DTYPE": "float8"})


def test_patch_module_does_not_import_torch():
    code = ("import sys, shims.registry as r; r.load(); assert 'shims.patches.detr' in sys.modules, r.broken(); "
            "assert 'torch' not in sys.modules; print('ok')")
    assert run_python(["-c", code], env=clean_env(), timeout=60).stdout.strip() == "ok"


# ---------------------------------------------------------------- the LW-DETR layout, as a user runs it


LWDETR_ENGINE = """
    import torch
    from torch import nn

    @torch.no_grad()
    def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, args=None):
        model.eval()
        if args.fp16_eval:
            model.half()
        scores = []
        for images in data_loader:
            if args.fp16_eval:
                images = images.half()
            outputs = model(images)
            if args.fp16_eval:
                for key in outputs.keys():
                    outputs[key] = outputs[key].float()
            scores.append(criterion(outputs))
        return scores
"""

LWDETR_MAIN = """
    import argparse, json, sys
    import torch
    from torch import nn
    from engine import evaluate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.LayerNorm(8))
            self.head = nn.Linear(8, 4)
        def forward(self, x):
            return {"pred_boxes": self.head(self.body(x)).sigmoid()}

    torch.manual_seed(0)
    model = Net()
    args = argparse.Namespace(fp16_eval=True)
    data = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    scores = evaluate(model, lambda out: out["pred_boxes"].dtype, None, data, None, "cpu", args)
    print(json.dumps({"params": sorted({str(p.dtype) for p in model.parameters()}), "seen": [str(s) for s in scores],
                      "flag_after": args.fp16_eval}))
"""


@pytest.mark.slow
@pytest.mark.skipif(cpu_float16_missing() is not None, reason=f"the unpatched script: {cpu_float16_missing()}")
def test_lwdetr_layout_script_under_shims_doctor(tmp_path):
    write(tmp_path / "engine.py", LWDETR_ENGINE)
    script = write(tmp_path / "main.py", LWDETR_MAIN)
    doctor = run_python(["-m", "shims", "doctor", script], cwd=tmp_path, timeout=120,
                        env=clean_env(SHIMS_PATCHES="detr"))
    assert json.loads(doctor.stdout.strip().splitlines()[0])["params"] == ["torch.float16"]  # the bug, observed
    with open(script) as f:
        call_line = next(i for i, line in enumerate(f, 1) if "= evaluate(" in line)
    printed = doctor.stdout + doctor.stderr
    assert f"main.py:{call_line}" in printed and "fp16-eval-half" in printed


@pytest.mark.slow
def test_lwdetr_layout_script_under_shims_run(tmp_path):
    """Also where the CPU has no float16 kernel: the patched evaluation needs none."""
    write(tmp_path / "engine.py", LWDETR_ENGINE)
    script = write(tmp_path / "main.py", LWDETR_MAIN)
    report = tmp_path / "receipt.json"
    proc = run_python(["-m", "shims", "run", script], cwd=tmp_path, timeout=120,
                      env=clean_env(SHIMS_PATCHES="detr", SHIMS_REPORT=report))
    fixed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fixed == {"params": ["torch.float32"], "seen": ["torch.float32", "torch.float32"], "flag_after": True}
    record = json.loads(report.read_text())["patches"]["detr"]
    assert record["targets"]["engine:evaluate"]["status"] == "applied"
    assert record["counters"]["evaluations_converted"] == 1


# ---------------------------------------------------------------- real rfdetr 1.5.2


@pytest.fixture(scope="module")
def rfdetr_setup(tmp_path_factory):
    pytest.importorskip("rfdetr", reason="rfdetr is not installed (pip install rfdetr==1.5.2)")
    from shims import versions
    if versions.installed("rfdetr") is None or not versions.installed("rfdetr").startswith("1.5"):
        pytest.skip(f"these tests drive rfdetr 1.5.x; installed: {versions.installed('rfdetr')}")
    root = ref.write_coco_dataset(tmp_path_factory.mktemp("coco"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # nothing may download: pretrain_weights=None builds offline
        model, criterion, post, loader, base_ds, args = ref.build_rfdetr_nano(root)
    import rfdetr.engine
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples, targets = next(iter(loader))
    ref.train_step(model, criterion, optimizer, samples, targets, pass_targets=True)
    float32 = copy.deepcopy(model)
    recorder = OutputRecorder(float32)
    args.fp16_eval = False
    rfdetr.engine.evaluate(float32, criterion, post, loader, base_ds, torch.device("cpu"), args)
    recorder.remove()
    return {"model": model, "optimizer": optimizer, "criterion": criterion, "post": post, "loader": loader,
            "base_ds": base_ds, "args": args, "batch": (samples, targets), "float32_outputs": recorder.batches,
            "original": rfdetr.engine.evaluate}


def fresh_rfdetr(setup):
    model = copy.deepcopy(setup["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizer.load_state_dict(copy.deepcopy(setup["optimizer"].state_dict()))
    return model, optimizer


def run_rfdetr(setup, model, evaluate=None, fp16_eval=True):
    """The real rfdetr evaluate, as rfdetr.main calls it; returns (stats, output recorder, criterion input dtypes)."""
    import rfdetr.engine
    evaluate = evaluate or rfdetr.engine.evaluate
    args = copy.copy(setup["args"])
    args.fp16_eval = fp16_eval
    seen = set()
    hook = setup["criterion"].register_forward_pre_hook(lambda m, inputs: seen.update(t.dtype for t in
                                                                                       leaves(inputs[0])))
    recorder = OutputRecorder(model)
    try:
        stats, _ = evaluate(model, setup["criterion"], setup["post"], setup["loader"], setup["base_ds"],
                            torch.device("cpu"), args=args, header="Test")
    finally:
        recorder.remove()
        hook.remove()
    assert args.fp16_eval is fp16_eval  # the caller's args are never modified
    return stats, recorder, seen


@pytest.fixture(scope="module")
def rfdetr_unpatched(rfdetr_setup):
    """The unpatched fp16_eval evaluation: (model, optimizer, output recorder, why its forward failed or None)."""
    import rfdetr.engine
    model, optimizer = fresh_rfdetr(rfdetr_setup)
    args = copy.copy(rfdetr_setup["args"])
    args.fp16_eval = True
    recorder, failed = run_unpatched_half_evaluation(model, lambda: rfdetr.engine.evaluate(
        model, rfdetr_setup["criterion"], rfdetr_setup["post"], rfdetr_setup["loader"], rfdetr_setup["base_ds"],
        torch.device("cpu"), args=args, header="Test"))
    return model, optimizer, recorder, failed


@pytest.mark.slow
def test_rfdetr_unpatched_fp16_eval_leaves_model_half(rfdetr_unpatched):
    model, optimizer, _, _ = rfdetr_unpatched
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert optimizer.param_groups[0]["params"][0].dtype == torch.float16


@pytest.mark.slow
def test_rfdetr_unpatched_fp16_eval_builds_a_graph_and_deviates(rfdetr_setup, rfdetr_unpatched):
    _, _, recorder, failed = rfdetr_unpatched
    if failed:
        pytest.skip(failed)  # test_rfdetr_patched_keeps_model_and_matches_float32 shows the patched path needs none
    assert recorder.graph_built  # rfdetr's evaluate has no no_grad
    assert max_deviation(recorder.batches, rfdetr_setup["float32_outputs"]) > 0


@pytest.mark.slow
def test_rfdetr_patched_keeps_model_and_matches_float32(rfdetr_setup):
    import rfdetr.engine
    import rfdetr.main
    model, optimizer = fresh_rfdetr(rfdetr_setup)
    before, opt_before = state_copy(model), optimizer_state_copy(optimizer)
    enable_detr(modules=())
    targets = detr_record()["targets"]
    assert targets["rfdetr.engine:evaluate"]["status"] == "applied"
    assert targets["rfdetr.main:evaluate"]["status"] == "applied"
    stats, recorder, seen = run_rfdetr(rfdetr_setup, model, evaluate=rfdetr.main.evaluate)  # main's own binding
    assert_state_unchanged(model, before)
    assert_optimizer_unchanged(optimizer, opt_before)
    assert not recorder.graph_built
    assert max_deviation(recorder.batches, rfdetr_setup["float32_outputs"]) == 0.0  # bitwise on CPU
    assert seen == {torch.float32}
    assert len(stats["coco_eval_bbox"]) == 12 and all(-1 <= v <= 1 for v in stats["coco_eval_bbox"])
    record = detr_record()
    assert record["counters"]["evaluations_converted"] == 1 and record["version"] == "1.5.2"
    assert any("rfdetr/engine.py:" in note and "model.half()" in note for note in record["notes"])
    assert any("samples.tensors = samples.tensors.half()" in note for note in record["notes"])
    shims.disable()
    assert rfdetr.engine.evaluate is rfdetr_setup["original"] and rfdetr.main.evaluate is rfdetr_setup["original"]


@pytest.fixture(scope="module")
def rfdetr_next_step(rfdetr_setup):
    """The loss and parameters of the next training step of a run that never evaluated."""
    untouched, untouched_opt = fresh_rfdetr(rfdetr_setup)
    samples, targets = rfdetr_setup["batch"]
    loss = ref.train_step(untouched, rfdetr_setup["criterion"], untouched_opt, samples, targets, seed=5,
                          pass_targets=True)
    return loss, {name: p.detach() for name, p in untouched.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_rfdetr_training_continues_as_if_never_evaluated(rfdetr_setup, rfdetr_next_step, grad_mode):
    evaluated, evaluated_opt = fresh_rfdetr(rfdetr_setup)
    enable_detr(modules=(), grad_mode=grad_mode)
    run_rfdetr(rfdetr_setup, evaluated)
    samples, targets = rfdetr_setup["batch"]
    loss = ref.train_step(evaluated, rfdetr_setup["criterion"], evaluated_opt, samples, targets, seed=5,
                          pass_targets=True)
    want_loss, want_params = rfdetr_next_step
    assert torch.equal(loss, want_loss)
    for name, p in evaluated.named_parameters():
        assert p.dtype == want_params[name].dtype and torch.equal(p, want_params[name]), f"{name} differs"


@pytest.mark.slow
@pytest.mark.skipif(CPU_AUTOCAST_FLOAT16_MISSING is not None, reason=str(CPU_AUTOCAST_FLOAT16_MISSING))
def test_rfdetr_float16_autocast_within_tolerance(rfdetr_setup):
    model, _ = fresh_rfdetr(rfdetr_setup)
    bound = float16_autocast_bound(model, [samples for samples, _ in rfdetr_setup["loader"]],
                                   rfdetr_setup["float32_outputs"])
    before = state_copy(model)
    enable_detr(modules=(), dtype="float16")
    _, recorder, seen = run_rfdetr(rfdetr_setup, model)
    deviation = max_deviation(recorder.batches, rfdetr_setup["float32_outputs"])
    assert_state_unchanged(model, before)
    assert not recorder.graph_built and seen == {torch.float32}
    assert 0 < deviation <= bound, (deviation, bound)  # > 0: the forward really ran in float16 autocast


@pytest.mark.slow
def test_rfdetr_fixed_upstream_from_1_6(rfdetr_setup, monkeypatch):
    """rfdetr >= 1.6 cannot be installed beside 1.5.2: the installed version is faked (shims.versions.installed)."""
    import rfdetr.engine
    from shims import versions
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "1.11.0" if name == "rfdetr" else real(name))
    enable_detr(modules=(REFERENCE,))
    targets = detr_record()["targets"]
    for name in ("rfdetr.engine:evaluate", "rfdetr.main:evaluate"):
        assert targets[name]["status"] == "fixed-upstream" and "1.11.0 >= 1.6" in targets[name]["reason"]
    assert rfdetr.engine.evaluate is rfdetr_setup["original"]
    assert targets[f"{REFERENCE}:evaluate"]["status"] == "applied"  # user LW-DETR code has no rfdetr version
    shims.disable()
    shims.enable(patches=["detr"], strict=True, options={"SHIMS_DETR_MODULES": ""})  # fixed upstream: no raise
    monkeypatch.setattr(versions, "installed", lambda name: "1.5.2" if name == "rfdetr" else real(name))
    shims.disable()
    enable_detr(modules=())
    assert detr_record()["targets"]["rfdetr.engine:evaluate"]["status"] == "applied"


def test_reference_evaluation_that_raises_leaves_model_as_it_was(reference_setup):
    def failing_loader():
        yield reference_setup["batches"][0]
        raise RuntimeError("data loader failed")

    model, _ = fresh_reference(reference_setup)
    before = state_copy(model)
    enable_detr(dtype=CPU_AUTOCAST_DTYPE)
    module = importlib.import_module(REFERENCE)
    with pytest.raises(RuntimeError, match="data loader failed"):
        module.evaluate(model, ref.FirstQueryCriterion(), {"bbox": ref.BoxPostProcess()}, failing_loader(),
                        reference_setup["coco"], "cpu", Args(fp16_eval=True))
    assert_state_unchanged(model, before)
    assert "forward" not in model.__dict__  # the autocast forward is gone with the evaluation
    assert detr_record()["counters"]["forwards_autocast"] == 1


def test_other_changes_to_the_model_are_reported(tmp_path, monkeypatch):
    write(tmp_path / "detr_shape_double.py", """
        import torch
        @torch.no_grad()
        def evaluate(model, data, args):
            if args.fp16_eval:
                model.half()
            model.double()
            return [model(x.double()) for x in data]
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("detr_shape_double")
    try:
        enable_detr(modules=("detr_shape_double",))
        model = torch.nn.Linear(3, 2)
        module.evaluate(model, [torch.rand(1, 3)], Args(fp16_eval=True))
        notes = detr_record()["notes"]
        assert any("changed 2 model tensor(s) anyway" in note for note in notes), notes
    finally:
        sys.modules.pop("detr_shape_double", None)
