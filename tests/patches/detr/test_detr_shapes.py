"""detr patch: what it refuses and why (the fingerprint on each shape of evaluate), its options, and an evaluation
that fails or changes the model in other ways. The reference subject and helpers are test_detr.py's."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import shims
from shims.errors import ShimsConfigError, ShimsPatchError
from tests.conftest import clean_env, run_python, write
from tests.patches.detr.test_detr import (  # reference_setup: a fixture
    CPU_AUTOCAST_DTYPE, REFERENCE, Args, assert_state_unchanged, cpu_float16_missing, detr_record, enable_detr,
    fresh_reference, no_half_kernel, ref, reference_setup, state_copy)


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
    with pytest.raises(ShimsConfigError, match=r"SHIMS_DETR_DTYPE': 'float8'.*auto, float16, bfloat16, float32"):
        shims.enable(patches=["detr"], options={"SHIMS_DETR_DTYPE": "float8"})


def test_patch_module_does_not_import_torch():
    code = ("import sys, shims.registry as r; r.load(); assert 'shims.patches.detr' in sys.modules, r.broken(); "
            "assert 'torch' not in sys.modules; print('ok')")
    assert run_python(["-c", code], env=clean_env(), timeout=60).stdout.strip() == "ok"


# ---------------------------------------------------------------- the LW-DETR layout, as a user runs it



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
