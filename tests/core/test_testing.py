"""shims.testing's comparison and fidelity runner: they fail on the smallest difference that matters (one unit in the
last place, a dtype, a missing key, a patch that did not apply), so the tests built on them can fail."""

from __future__ import annotations

import math

import pytest
import torch

from shims.testing import BITWISE, Tolerance, assert_same, check_fidelity, snapshot


def test_bitwise_catches_one_unit_in_the_last_place():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(math.inf))
    with pytest.raises(AssertionError, match=r"1 of 3 element\(s\) differ \(bitwise\), first at \(1,\)"):
        assert_same(a, b)
    assert_same(a, a.clone())


def test_dtype_shape_type_and_keys_are_part_of_equality():
    with pytest.raises(AssertionError, match="dtype torch.float64 != expected torch.float32"):
        assert_same(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"shape \(3,\) != expected \(2,\)"):
        assert_same(torch.zeros(2), torch.zeros(3))
    with pytest.raises(AssertionError, match=r"keys differ \(missing \['b'\], unexpected \[\]\)"):
        assert_same({"a": 1, "b": 2}, {"a": 1})
    with pytest.raises(AssertionError, match="list of 1 != expected tuple of 1"):
        assert_same((1,), [1])
    with pytest.raises(AssertionError, match=r"result\[0\]\['w'\]: 2 != expected 1"):
        assert_same([{"w": 1}], [{"w": 2}])


def test_bitwise_tells_infinity_from_the_largest_float_and_the_signs_of_zero():
    largest = torch.finfo(torch.float32).max
    for a, b in ((math.inf, largest), (-math.inf, -largest), (0.0, -0.0), (math.inf, math.nan)):
        with pytest.raises(AssertionError, match="bitwise"):
            assert_same(torch.tensor([a]), torch.tensor([b]))
    with pytest.raises(AssertionError, match="bitwise"):
        assert_same(torch.tensor([complex(0.0, 1.0)]), torch.tensor([complex(-0.0, 1.0)]))
    assert_same(torch.tensor([math.inf, -0.0]), torch.tensor([math.inf, -0.0]))
    with pytest.raises(AssertionError, match="sign of zero"):
        assert_same(0.0, -0.0)


def test_nan_equals_nan():
    assert_same(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert_same(float("nan"), float("nan"))
    with pytest.raises(AssertionError):
        assert_same(torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_a_tolerance_needs_its_reason_and_is_applied():
    with pytest.raises(ValueError, match="needs `why`"):
        Tolerance(atol=1e-3)
    half = Tolerance(rtol=2 ** -11 * 4, why="float16 unit roundoff times 4 accumulations")
    assert_same(torch.tensor([1.0]), torch.tensor([1.0 + 2 ** -10]), half)
    with pytest.raises(AssertionError, match="the bound is exceeded"):
        assert_same(torch.tensor([1.0]), torch.tensor([1.01]), half)
    assert repr(BITWISE) == "BITWISE"


def test_snapshot_holds_parameters_and_buffers_detached():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = snapshot(model)
    assert {"param:0.weight", "buffer:1.running_mean", "buffer:1.num_batches_tracked"} <= set(state)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(AssertionError, match="param:0.weight"):
        assert_same(state, snapshot(model))


def test_fidelity_requires_the_patch_to_have_applied():
    with pytest.raises(AssertionError, match="the doctr patch did not apply"):
        check_fidelity(lambda: 1, lambda: 1, patch="doctr", options={"SHIMS_DOCTR_MODULES": "no_such_module"})


def test_fidelity_runs_each_variant_from_the_same_seed():
    draws = check_fidelity(lambda: torch.rand(3), lambda: torch.rand(3), patch="doctr", seed=7, require_applied=False)
    assert_same(draws.unpatched, draws.fixed)
    torch.manual_seed(7)
    assert_same(torch.rand(3), draws.patched)
