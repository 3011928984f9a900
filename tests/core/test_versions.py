"""Version verdicts: the supported range, the release that fixed the bug upstream, per-target distributions."""
from __future__ import annotations

import importlib
import sys
from importlib import metadata

import pytest

import shims
from shims import engine
from shims.patch import Target
from tests.core.conftest import fake_patch, enable, target_status

PYTEST_VERSION = metadata.version("pytest")
MISSING_DIST = "shims-test-no-such-distribution"


@pytest.mark.parametrize("kwargs, status, reason_words", [
    ({"supported": f">={PYTEST_VERSION}"}, "applied", []),
    ({"supported": "<1"}, "skipped", ["pytest", PYTEST_VERSION, "<1"]),
    ({"supported": ">=1,<2"}, "skipped", ["pytest", ">=1,<2"]),
    ({"fixed_in": PYTEST_VERSION}, "fixed-upstream", ["pytest", PYTEST_VERSION]),
    ({"fixed_in": "1.0"}, "fixed-upstream", ["pytest", "1.0"]),
    ({"fixed_in": "9999"}, "applied", []),
], ids=["in-range", "below-range", "outside-range", "fixed-in-this-version", "fixed-earlier", "fixed-later"])
def test_version_range_and_fixed_in_of_the_patch_distribution(target, kwargs, status, reason_words):
    enable(fake_patch(target, distribution="pytest", **kwargs))
    module = importlib.import_module(target)
    record = target_status()
    assert record["status"] == status and record["version"] == PYTEST_VERSION
    assert hasattr(module.train, "__shims_original__") is (status == "applied")
    for word in reason_words:
        assert word in record["reason"], record["reason"]


def test_version_skip_raises_in_strict_mode_but_fixed_upstream_does_not(target):
    enable(fake_patch(target, distribution="pytest", fixed_in="1.0"), SHIMS_STRICT="1")
    importlib.import_module(target)
    assert target_status()["status"] == "fixed-upstream"
    engine.reset()
    sys.modules.pop(target, None)
    enable(fake_patch(target, distribution="pytest", supported="<1"), SHIMS_STRICT="1")
    with pytest.raises(shims.ShimsPatchError, match="'fake'.*supported range <1"):
        importlib.import_module(target)


def test_a_distribution_that_is_not_installed_does_not_block_the_patch(target):
    enable(fake_patch(target, distribution=MISSING_DIST, supported="<1"))
    module = importlib.import_module(target)
    assert target_status()["status"] == "applied" and hasattr(module.train, "__shims_original__")


def test_a_targets_distribution_overrides_the_patchs(target):
    # the patch's package (pytest) is fixed upstream; one target's package is another one, not installed
    patch = fake_patch(target, distribution="pytest", fixed_in="1.0",
                       targets=(Target(target, "train", distribution=MISSING_DIST), Target(target, "evaluate")))
    enable(patch)
    module = importlib.import_module(target)
    assert target_status(module=target, qualname="train")["status"] == "applied"
    assert hasattr(module.train, "__shims_original__")
    evaluate = target_status(module=target, qualname="evaluate")
    assert evaluate["status"] == "fixed-upstream" and "pytest" in evaluate["reason"]
    assert not hasattr(module.evaluate, "__shims_original__")


def test_a_targets_distribution_is_checked_when_the_patch_has_none(target):
    patch = fake_patch(target, fixed_in="1.0",
                       targets=(Target(target, "train", distribution="pytest"), Target(target, "evaluate")))
    enable(patch)
    module = importlib.import_module(target)
    train = target_status(module=target, qualname="train")
    assert train["status"] == "fixed-upstream" and "pytest" in train["reason"] and PYTEST_VERSION in train["reason"]
    assert not hasattr(module.train, "__shims_original__")
    assert target_status(module=target, qualname="evaluate")["status"] == "applied"  # user code: no version


def test_a_release_that_fixed_the_bug_and_moved_the_function_is_fixed_upstream_not_skipped(target):
    """The version verdict comes before the attribute lookup (rfdetr >= 1.6 has no engine.evaluate at all)."""
    enable(fake_patch(target, distribution="pytest", fixed_in="1.0", targets=("train", "removed_in_the_fix")))
    importlib.import_module(target)
    gone = target_status(module=target, qualname="removed_in_the_fix")
    assert gone["status"] == "fixed-upstream" and "pytest" in gone["reason"], gone
