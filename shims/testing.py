"""shims.testing: the fidelity kit shims' own patches are tested with, for anyone who writes a patch.

Two checks, and pytest fixtures for both (docs/plugins.md shows them in use):

Fidelity -- a patched run is the run the upstream fix gives. `check_fidelity(buggy, fixed, patch=...)` runs three
variants from the same seed, each in a clean engine: `buggy()` unpatched, `buggy()` with the patch enabled, and
`fixed()` (the loop with the upstream fix) unpatched. Each callable runs the loop and returns what it produced:
weights, buffers, outputs, losses (`snapshot(model)` captures a module's parameters and buffers), as any nesting of
dicts, lists, tuples, tensors, arrays and numbers. The patched result must equal the fixed one bitwise (same dtype,
same shape, same bits; NaN equal to NaN), or within a stated `Tolerance` whose reason says where the bound comes from.
The unpatched result is returned too, so a test can also assert that the bug is real (it usually differs).

Orderings -- `check_orderings(patch, modules=...)` runs, in fresh interpreters, every order of import / patch /
unpatch for every target the patch declares in `modules`: shims enabled before the import and after it, enabled a
second time and the module imported again (nothing is wrapped twice), disabled (the attribute `is` the original
object), enabled again, disabled again.

pytest: `pytest_plugins = ["shims.testing"]` in a conftest.py gives the fixtures `shims_engine` (a clean engine before
and after the test), `shims_fidelity` (check_fidelity) and `shims_orderings` (check_orderings with the test's
tmp_path). Nothing is registered with pytest unless a conftest asks for it: installing shims changes no test run.

torch is imported only by the functions that compare tensors; this module is never imported by `import shims.auto`.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

__all__ = ["Tolerance", "BITWISE", "FidelityResult", "check_fidelity", "run_variant", "snapshot", "assert_same",
           "OrderingsResult", "check_orderings", "seed_everything", "clean_engine"]


# ---------------------------------------------------------------- comparing results


class Tolerance:
    """How far a patched result may be from the fixed one: |a - b| <= atol + rtol * |b|, element-wise.

    `why` is required for anything but bitwise: the bound must come from what is guaranteed (e.g. "float16 unit
    roundoff 2**-11 times 12 accumulation steps"), never from the difference observed between two kernels.
    """

    __slots__ = ("atol", "rtol", "why")

    def __init__(self, atol=0.0, rtol=0.0, why=""):
        if atol < 0 or rtol < 0:
            raise ValueError(f"Tolerance(atol={atol!r}, rtol={rtol!r}): both must be 0 or more")
        if (atol or rtol) and not why.strip():
            raise ValueError("a Tolerance other than bitwise needs `why`: where the bound comes from")
        self.atol, self.rtol, self.why = float(atol), float(rtol), why

    @property
    def bitwise(self):
        return self.atol == 0 and self.rtol == 0

    def __repr__(self):
        return "BITWISE" if self.bitwise else f"Tolerance(atol={self.atol}, rtol={self.rtol}, why={self.why!r})"


BITWISE = Tolerance()


def _is_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_array(value):
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _compare_tensors(expected, actual, tolerance, path):
    import torch
    if expected.dtype != actual.dtype:
        return f"{path}: dtype {actual.dtype} != expected {expected.dtype}"
    if expected.shape != actual.shape:
        return f"{path}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if tolerance.bitwise or not (a.is_floating_point() or a.is_complex()):
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.is_floating_point():
            # bitwise, but NaN equals NaN whatever its payload: every other value by value and sign (inf is not the
            # largest finite number, -0.0 is not 0.0)
            nan_a, nan_b = a.isnan(), b.isnan()
            bad = (nan_a != nan_b) | (~nan_a & ~nan_b & ((a != b) | (a.signbit() != b.signbit())))
            same = not bool(bad.any())
        else:
            bad = a != b
            same = torch.equal(a, b)
        if same:
            return None
        where = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
        worst = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item() if a.numel() else 0.0
        return (f"{path}: {int(bad.sum())} of {a.numel()} element(s) differ (bitwise), first at {where}: "
                f"{a[where].item() if a.dim() else a.item()!r} != expected {b[where].item() if b.dim() else b.item()!r}"
                f"; largest |difference| {worst:.3e}")
    if torch.allclose(a, b, atol=tolerance.atol, rtol=tolerance.rtol, equal_nan=True):
        return None
    excess = ((a.double() - b.double()).abs() - (tolerance.atol + tolerance.rtol * b.double().abs())).max().item()
    return f"{path}: outside {tolerance!r}: the bound is exceeded by {excess:.3e}"


def _differences(expected, actual, tolerance, path, out):
    if _is_array(expected) or _is_array(actual):
        import torch
        expected = torch.as_tensor(expected) if _is_array(expected) else expected
        actual = torch.as_tensor(actual) if _is_array(actual) else actual
    if _is_tensor(expected) or _is_tensor(actual):
        if not (_is_tensor(expected) and _is_tensor(actual)):
            out.append(f"{path}: {type(actual).__name__} != expected {type(expected).__name__}")
            return
        found = _compare_tensors(expected, actual, tolerance, path)
        if found:
            out.append(found)
        return
    if isinstance(expected, dict) and isinstance(actual, dict):
        missing = [k for k in expected if k not in actual]
        extra = [k for k in actual if k not in expected]
        if missing or extra:
            out.append(f"{path}: keys differ (missing {missing}, unexpected {extra})")
            return
        for key in expected:
            _differences(expected[key], actual[key], tolerance, f"{path}[{key!r}]", out)
        return
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if type(expected) is not type(actual) or len(expected) != len(actual):
            out.append(f"{path}: {type(actual).__name__} of {len(actual)} != expected "
                       f"{type(expected).__name__} of {len(expected)}")
            return
        for i, (e, a) in enumerate(zip(expected, actual)):
            _differences(e, a, tolerance, f"{path}[{i}]", out)
        return
    if isinstance(expected, float) and isinstance(actual, float) and not tolerance.bitwise:
        if not math.isclose(actual, expected, rel_tol=tolerance.rtol, abs_tol=tolerance.atol):
            out.append(f"{path}: {actual!r} != expected {expected!r} within {tolerance!r}")
        return
    if isinstance(expected, float) and isinstance(actual, float) and expected != expected and actual != actual:
        return  # NaN == NaN
    if isinstance(expected, float) and isinstance(actual, float) and expected == actual == 0.0 \
            and math.copysign(1.0, expected) != math.copysign(1.0, actual):
        out.append(f"{path}: {actual!r} != expected {expected!r} (the sign of zero)")
        return
    if type(expected) is not type(actual) or expected != actual:
        out.append(f"{path}: {actual!r} != expected {expected!r}")


def assert_same(expected, actual, tolerance=BITWISE, label="result"):
    """Raise AssertionError listing every difference (up to 20) between two results (see the module docstring)."""
    out = []
    _differences(expected, actual, tolerance, label, out)
    if out:
        shown = "\n  ".join(out[:20]) + (f"\n  ... and {len(out) - 20} more" if len(out) > 20 else "")
        raise AssertionError(f"{label} differs ({tolerance!r}):\n  {shown}")


def snapshot(module):
    """A module's parameters and buffers, detached and cloned: {"param:name": tensor, "buffer:name": tensor}."""
    state = {f"param:{name}": p.detach().clone() for name, p in module.named_parameters()}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in module.named_buffers()})
    return state


# ---------------------------------------------------------------- running the variants


def seed_everything(seed):
    """Seed Python's, numpy's (when imported) and torch's (when imported) generators."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def clean_engine():
    """Disable shims and forget its receipt (a fresh engine), as at the start of a process."""
    from shims import engine
    engine.reset()


def run_variant(loop, *, seed=0, patches=None, options=None, mode="fix"):
    """`loop()` from `seed` in a clean engine with `patches` enabled (None or []: shims off). Returns
    (loop's result, the receipt). The engine is reset afterwards, so every original is back."""
    import shims
    clean_engine()
    receipt = None
    try:
        if patches:
            shims.enable(patches=list(patches), options=options or {}, mode=mode)
        seed_everything(seed)
        result = loop()
        receipt = shims.status()
    finally:
        clean_engine()
    return result, receipt


class FidelityResult:
    """The three variants' results, and the receipt of the patched run."""

    __slots__ = ("unpatched", "patched", "fixed", "receipt")

    def __init__(self, unpatched, patched, fixed, receipt):
        self.unpatched, self.patched, self.fixed, self.receipt = unpatched, patched, fixed, receipt

    def record(self, patch):
        return self.receipt["patches"][patch]


def check_fidelity(buggy, fixed, *, patch, seed=0, options=None, tolerance=BITWISE, require_applied=True):
    """Run `buggy()` unpatched, `buggy()` with `patch` enabled and `fixed()` unpatched, each from `seed`; assert the
    patched result equals the fixed one (bitwise, or within `tolerance`). Returns a FidelityResult.

    require_applied: also assert the patch's receipt says "applied" (a patch that never ran would pass trivially
    when the loops happen to agree).
    """
    unpatched, _ = run_variant(buggy, seed=seed)
    patched, receipt = run_variant(buggy, seed=seed, patches=[patch], options=options)
    reference, _ = run_variant(fixed, seed=seed)
    if require_applied:
        status = receipt["patches"].get(patch, {}).get("status")
        assert status == "applied", (f"the {patch} patch did not apply (status {status!r}): "
                                     f"{receipt['patches'].get(patch, {}).get('reason')}")
    assert_same(reference, patched, tolerance, label=f"patched {patch} run vs the upstream-fixed run")
    return FidelityResult(unpatched, patched, reference, receipt)


# ---------------------------------------------------------------- import / patch / unpatch orderings


ORDERS = ("before", "after")  # shims enabled before the target module is imported, or after


def _child():
    """Run in a fresh interpreter by check_orderings: one order, every target in the given modules."""
    import importlib

    import shims
    order, patch, modules, options = json.loads(sys.argv[1])

    def enable():
        return shims.enable(patches=[patch], options=options)["patches"][patch]

    def lookup(target):
        owner = sys.modules[target["module"]]
        *path, attr = target["qualname"].split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)

    def layers(obj):
        n = 0
        while getattr(obj, "__shims_original__", None) is not None:
            obj, n = obj.__shims_original__, n + 1
        return n

    def import_all():
        for name in modules:
            importlib.import_module(name)

    def declared(rec):
        # the targets as the receipt lists them (a plug-in's are known once its trigger module is imported)
        found = [key.split(":", 1) for key in rec["targets"]]
        return [{"module": m, "qualname": q} for m, q in found if m in modules]

    def attributes():
        # what the modules hold before shims touches them: module attributes and their classes' own attributes
        out = {}
        for name in modules:
            for key, value in list(vars(sys.modules[name]).items()):
                out[f"{name}:{key}"] = value
                if isinstance(value, type):
                    out.update((f"{name}:{key}.{k}", v) for k, v in list(vars(value).items()))
        return out

    seen = {}
    if order == "after":
        import_all()
        before = attributes()
        rec = enable()
        targets = declared(rec)
        originals = [before.get(f"{t['module']}:{t['qualname']}") for t in targets]
    else:
        enable()
        seen["imported_before_enable"] = sorted(m for m in modules if m in sys.modules)
        import_all()
        targets = declared(shims.status()["patches"][patch])
        originals = [getattr(lookup(t), "__shims_original__", None) for t in targets]
    seen["targets"] = [f"{t['module']}:{t['qualname']}" for t in targets]
    patched = [lookup(t) for t in targets]
    rec = enable()  # the same configuration again
    import_all()  # and a second import
    checks = []
    for i, target in enumerate(targets):
        checks.append({
            "target": seen["targets"][i],
            "status": rec["targets"].get(seen["targets"][i], {}).get("status"),
            "patched": (originals[i] is not None and patched[i] is not originals[i]
                        and getattr(patched[i], "__shims_original__", None) is originals[i]),
            "layers": layers(patched[i]),
            "same_after_second_enable": lookup(target) is patched[i],
        })
    shims.disable()
    for i, target in enumerate(targets):
        checks[i]["reverted"] = lookup(target) is originals[i]
    enable()
    for i, target in enumerate(targets):
        again = lookup(target)
        checks[i]["patched_again"] = (again is not originals[i]
                                      and getattr(again, "__shims_original__", None) is originals[i])
        checks[i]["layers_again"] = layers(again)
    shims.disable()
    for i, target in enumerate(targets):
        checks[i]["reverted_again"] = lookup(target) is originals[i]
    seen["checks"] = checks
    print(json.dumps(seen))


EXPECTED = {"status": "applied", "patched": True, "layers": 1, "same_after_second_enable": True, "reverted": True,
            "patched_again": True, "layers_again": 1, "reverted_again": True}


class OrderingsResult:
    """Per order ("before", "after"): the targets checked and each target's observations."""

    __slots__ = ("orders",)

    def __init__(self, orders):
        self.orders = orders

    def targets(self):
        return sorted({c["target"] for seen in self.orders.values() for c in seen["checks"]})


def check_orderings(patch, modules, *, options=None, path=(), cwd=None, env=None, timeout=240):
    """Every order of import / patch / unpatch for each target `patch` declares in `modules` (importable module
    names), each order in a fresh interpreter. `path`: folders put first on the child's PYTHONPATH (where a test lays
    out stand-ins for the framework's modules). Raises AssertionError naming the order, the target and what was
    wrong; returns an OrderingsResult. At least one declared target must be in `modules`."""
    modules = [modules] if isinstance(modules, str) else list(modules)
    child_env = dict(os.environ if env is None else env)
    for key in [k for k in child_env if k.startswith("SHIMS_")]:
        del child_env[key]
    inherited = [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    child_env["PYTHONPATH"] = os.pathsep.join([os.fspath(p) for p in path] + inherited)
    orders = {}
    for order in ORDERS:
        proc = subprocess.run([sys.executable, "-c", "from shims.testing import _child; _child()",
                               json.dumps([order, patch, modules, dict(options or {})])],
                              env=child_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if proc.returncode != 0:
            raise AssertionError(f"{patch}, shims enabled {order} the import: the check failed to run:\n"
                                 f"{proc.stderr[-4000:]}")
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        if not seen["targets"]:
            raise AssertionError(f"{patch} declares no target in {modules}: nothing to check")
        if order == "before" and seen.get("imported_before_enable"):
            raise AssertionError(f"{patch}: {seen['imported_before_enable']} were already imported when shims was "
                                 "enabled, so the 'before' order cannot be checked with these modules")
        for check in seen["checks"]:
            wrong = {k: check.get(k) for k, v in EXPECTED.items() if check.get(k) != v}
            if wrong:
                raise AssertionError(f"{patch}, shims enabled {order} the import, {check['target']}: {wrong} "
                                     f"(expected {dict((k, EXPECTED[k]) for k in wrong)})")
        orders[order] = seen
    return OrderingsResult(orders)


# ---------------------------------------------------------------- pytest fixtures (pytest_plugins = ["shims.testing"])

try:
    import pytest as _pytest
except ImportError:  # pytest is needed only for the fixtures
    _pytest = None

if _pytest is not None:
    @_pytest.fixture
    def shims_engine():
        """A clean shims engine for the test, reset again afterwards (every original back)."""
        clean_engine()
        from shims import engine
        yield engine.get()
        clean_engine()

    @_pytest.fixture
    def shims_fidelity(shims_engine):
        """`check_fidelity`, with the engine reset before and after."""
        return check_fidelity

    @_pytest.fixture
    def shims_orderings(tmp_path):
        """`check_orderings(patch, modules, ...)` run from the test's tmp_path (put first on the child's path)."""
        def check(patch, modules, **kwargs):
            kwargs.setdefault("cwd", str(tmp_path))
            kwargs["path"] = [tmp_path, *kwargs.get("path", ())]
            return check_orderings(patch, modules, **kwargs)
        return check
