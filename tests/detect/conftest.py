"""Helpers shared by the detect tests (import them as `from tests.detect.conftest import ...`).

    line_with(path, text)   file:line of the one line of `path` that contains `text`
    observe(loop, ...)      run `loop` in detect mode (generic detectors only), revert, return the receipt's findings
    by_kind(findings)       {(kind, where): finding}
    chromium()              the headless Chromium binary (pytest.skip, saying why, where there is none)
"""

from __future__ import annotations

import os
import shutil

import pytest

import shims

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                    "detect_demo.py")
FIXED_DEMO = os.path.join(os.path.dirname(DEMO), "detect_demo_fixed.py")
SARIF_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sarif-schema-2.1.0.json")


def line_with(path, text):
    """file:line of the single line of `path` containing `text`."""
    with open(path) as f:
        hits = [n for n, line in enumerate(f, 1) if text in line]
    assert len(hits) == 1, f"{text!r} is on {len(hits)} lines of {path}"
    return f"{path}:{hits[0]}"


def observe(loop, *args, **kwargs):
    """Run `loop` in detect mode (generic detectors only), revert, and return the detectors' findings (dicts)."""
    shims.enable(patches="none", mode="detect")
    try:
        loop(*args, **kwargs)
    finally:
        shims.disable()
    return shims.status()["patches"]["detect"]["findings"]


def by_kind(findings):
    return {(f["kind"], f["where"]): f for f in findings}


def chromium():
    """The path of a headless Chromium (Debian's `chromium` package; scripts/setup.sh installs it), or skip."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on PATH (scripts/setup.sh installs Debian's `chromium` where apt-get is allowed; "
                "elsewhere: apt-get install -y chromium)")
