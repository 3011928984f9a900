"""Session.intercept: the checks and the failure guard every detector shares, written once."""

from __future__ import annotations

import pytest
import torch

import shims
from shims import detect
from shims.detect.detector import Detector
from tests.detect.conftest import line_with


class Probe(Detector):
    name = "probe"
    kinds = {}

    def install(self):
        self.calls, self.fail_at = [], None
        self.session.intercept(self, torch.Tensor, "tolist", self.on_call, when=lambda t, *a, **k: t.dim() == 1)

    def on_call(self, call):
        if self.fail_at == "before":
            raise RuntimeError("detector bug before the call")
        result = call.proceed()
        self.calls.append((self.session.sites.caller(call.frame), call.seconds, result))
        if self.fail_at == "after":
            raise RuntimeError("detector bug after the call")
        return result


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setattr(detect, "detector_classes", lambda: (Probe,))
    shims.enable(patches="none", mode="detect")
    found = next(d for d in detect._CURRENT.detectors if isinstance(d, Probe))
    yield found
    shims.disable()


def test_intercept_reports_the_caller_and_time_and_lets_the_call_through(probe):
    assert torch.tensor([1, 2]).tolist() == [1, 2]  # the call
    assert torch.zeros(2, 2).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # `when` says no: not intercepted
    [(where, seconds, result)] = probe.calls
    assert where == line_with(__file__, "# the" + " call")
    assert seconds >= 0 and result == [1, 2]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_detector_that_raises_is_switched_off_and_the_call_still_returns(probe, when):
    probe.fail_at = when
    assert torch.tensor([3]).tolist() == [3]
    assert not probe.on
    assert "probe" in str(shims.status()["patches"]["detect"]["notes"])
    assert len(probe.calls) == (1 if when == "after" else 0)  # the original ran once either way


def test_the_originals_own_exception_reaches_the_caller_unchanged(probe):
    with pytest.raises(TypeError):
        torch.tensor([1]).tolist(5)  # tolist takes no argument: torch's own error
    assert probe.on
