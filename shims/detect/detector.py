"""What a detector is (`Detector`: what it declares) and what it accumulates per finding (`Finding`).

A detector is one module in shims/detect/detectors/ defining DETECTOR, a Detector subclass: its name, its kinds,
what it observes, the torch APIs it needs, and install() / describe() / finish(). Everything it shares with the
others (events, the step clock, call sites, wrapping, graph tracking, the receipt) is the Session's (core.py), reached
as self.session. docs/detect.md, "How to add a detector", has a template.
"""

from __future__ import annotations

from collections import deque

from shims.detect import report

SAMPLES = 64  # timing samples kept per finding (medians)


class Detector:
    """One detector. Subclass it in shims/detect/detectors/<module>.py, set the class attributes, implement
    `install` and `describe` (and `finish` for findings that need the whole run): being in detectors/ is enough. `self.session` is the Session; `self.on` turns False when the
    detector is switched off (after an error it raised, or on revert): wrappers it installs check it first."""

    name = ""  # short identifier: the receipt target torch:detectors.<name> when refused or failed
    kinds = {}  # kind -> one line: what a finding of that kind means
    docs = {}  # kind -> (what, count, cost, fix): its row of docs/detect.md's table (shims/detect/catalogue.py)
    observes = ""  # what it observes, in words (the receipt's "observing ..." line)
    needs = ()  # compat.TorchAPI features it cannot work without: refused, with the reason, where one is absent

    def __init__(self, session):
        self.session = session
        self.on = True

    def missing(self, api):
        """None when this torch supports the detector, else why not (the receipt's reason for refusing it)."""
        return api.missing(*self.needs)

    def install(self):
        """Subscribe to the session's events and wrap what must be wrapped (through the session: it reverts)."""

    def finish(self):
        """The run is over (final flush): add the findings that need the whole run."""

    def describe(self, finding):
        """(message, cost, fix) of one of this detector's findings, from what its Finding holds now."""
        return self.kinds.get(finding.kind, finding.kind), None, None


class Finding:
    """What one finding (kind, where) has accumulated. `count`, `samples` (seconds, the last SAMPLES) and `info`
    (anything describe() needs) are the detector's to fill; `published` is the part of `count` in the receipt."""

    __slots__ = ("kind", "where", "count", "published", "samples", "info")

    def __init__(self, kind, where):
        self.kind, self.where, self.count, self.published = kind, where, 0, 0
        self.samples = deque(maxlen=SAMPLES)
        self.info = {}

    def add(self, seconds=None):
        self.count += 1
        if seconds is not None:
            self.samples.append(seconds)

    def seconds(self):
        """Median of the timing samples (None without any)."""
        return report.median(self.samples)
