"""detr patch: a fp16_eval evaluation leaves the model as it was and matches a float32 evaluation.

Two subjects, the same assertions:
- an LW-DETR-style `evaluate` written here (tests/patches/detr/reference.py: no_grad decorated, the fp16_eval `.half()`
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
import os
import re
import sys

import pytest
import torch

import shims
from shims.testing import assert_same

REFERENCE = "tests.patches.detr.reference"
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
    """The largest |output - float32 reference| over every batch; a NaN counts as an infinite deviation."""
    assert len(batches) == len(reference) and len(batches) > 0
    worst = 0.0
    for got, want in zip(batches, reference):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            worst = max(worst, (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item())
    return worst


def assert_same_batches(batches, reference):
    """Every output of every batch equal to the float32 reference's, bitwise and in dtype (shims.testing)."""
    assert len(batches) == len(reference) and len(batches) > 0
    for i, (got, want) in enumerate(zip(batches, reference)):
        assert_same(list(want), list(got), label=f"batch {i}")


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
    assert_same(reference_setup["float32_outputs"], recorder.batches, label="outputs")  # bitwise on CPU, float32
    assert not recorder.graph_built
    assert criterion.seen_dtypes == {torch.float32} and post.seen_dtypes == {torch.float32}
    assert len(stats["coco_eval_bbox"]) == 12 and stats == ema_stats
    record = detr_record()
    assert record["counters"]["evaluations_converted"] == 2
    assert record["counters"]["model_half_prevented"] == 2
    assert any("model.half()" in note and os.path.join("detr", "reference.py:") in note for note in record["notes"])


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
    assert_same_batches(recorder.batches, reference_setup["float32_outputs"])
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
    assert os.path.join("detr", "reference.py:") in finding["message"] and "model.half()" in finding["message"]



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
