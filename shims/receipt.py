"""The receipt: what each patch did in this process, and why. `shims.status()` returns `Receipt.as_dict()`.

Statuses of a target (and of a patch: the most telling of its targets' statuses), one named constant each below:
    applied         the replacement is in place (fix mode), or the observer is installed (detect mode)
    not-imported    the target's module (or the script's function) has not appeared yet
    skipped         it could not apply: version out of range, fingerprint drift, shape not recognised (the reason says)
    fixed-upstream  the installed version already has the upstream fix; nothing to do
    disabled        turned off by SHIMS_PATCHES / SHIMS_DISABLE / SHIMS_MODE=off
    error           the patch raised; the target was left as it was (strict mode raises instead)
    reverted        shims.disable() put the original back
One more value exists only on the way in, as `Skip(reason, status=SKIPPED_BENIGN)`: nothing to do and nothing
wrong (a function without the buggy shape, a patch with no observe-only variant). The receipt records it as
"skipped", and strict mode does not raise for it.
The JSON layout is documented in docs/detect.md ("The JSON report"); the statuses are the same in both modes.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, TypedDict

APPLIED = "applied"
NOT_IMPORTED = "not-imported"
SKIPPED = "skipped"
SKIPPED_BENIGN = "skipped-benign"  # a Skip status only: recorded as SKIPPED, never raised in strict mode
FIXED_UPSTREAM = "fixed-upstream"
DISABLED = "disabled"
ERROR = "error"
REVERTED = "reverted"
STATUSES = (APPLIED, NOT_IMPORTED, SKIPPED, FIXED_UPSTREAM, DISABLED, ERROR, REVERTED)  # what a receipt can show
SKIP_STATUSES = (SKIPPED, SKIPPED_BENIGN, FIXED_UPSTREAM)  # what `Skip(reason, status=...)` accepts
BUILT_IN = "shims"  # the origin of the patches shipped in shims.patches (plug-ins name their distribution)

SCHEMA = 1

# Where the project's documentation is published: `list` and the receipt link there, never to a path in the
# repository (the wheel ships no docs/). The one place that knows the address.
DOCS_URL = "https://github.com/torch-shims/torch-shims/blob/main/"


def docs_url(path):
    """The URL of a documentation page given by its path in the repository (`docs/patches/doctr.md`); a URL or an
    empty path is returned as it is."""
    if not path or "://" in path:
        return path
    return DOCS_URL + path.lstrip("/")


_RANK = (ERROR, APPLIED, SKIPPED, FIXED_UPSTREAM, REVERTED, NOT_IMPORTED, DISABLED)


class TargetData(TypedDict):
    """One target's line in the receipt: its status (above) and why."""
    status: str
    reason: str


class FindingData(TypedDict):
    """An observation of detect mode: what, where (`file:line`), how often, what it costs, the fix."""
    kind: str
    message: str
    where: Optional[str]
    count: int
    cost: Optional[str]
    fix: Optional[str]


class PatchData(TypedDict):
    """What one patch did in this process (`shims.status()["patches"][name]`)."""
    status: str
    reason: str
    summary: str
    docs: str  # the URL of its documentation page
    distribution: Optional[str]
    version: Optional[str]
    origin: str  # "shims" for a built-in patch, else the plug-in's distribution and entry point
    targets: Dict[str, TargetData]  # "module:qualname" -> its status
    counters: Dict[str, int]
    notes: List[str]
    findings: List[FindingData]


class ReceiptData(TypedDict):
    """`shims.status()`, and the JSON written to SHIMS_REPORT (the same content)."""
    schema: int
    pid: int
    mode: Optional[str]
    strict: bool
    python: str
    torch: Optional[str]
    patches: Dict[str, PatchData]


class PatchRecord:
    """What one patch did: per-target status, counters, notes and (detect mode) findings."""

    def __init__(self, name, summary="", docs="", distribution=None, origin=BUILT_IN):
        self.name, self.summary, self.docs, self.distribution = name, summary, docs_url(docs), distribution
        self.origin = origin  # where the patch came from: "shims", or the plug-in's distribution and entry point
        self.version = None
        self.targets = {}  # "module:qualname" -> {"status", "reason"}
        self.counters = {}
        self.notes = []
        self.findings = []
        self.observed = None  # detect mode: what was observed (steps, forwards, timeline), written by the session
        self.disabled_reason = None
        self._lock = threading.Lock()

    def target(self, target, status, reason=""):
        with self._lock:
            self.targets[str(target)] = {"status": status, "reason": reason}

    def count(self, name, n=1):
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def note(self, text):
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    def finding(self, kind, message, *, where=None, cost=None, fix=None, count=1):
        """An observation (detect mode). Findings with the same kind and place are merged, their counts added."""
        with self._lock:
            for existing in self.findings:
                if existing["kind"] == kind and existing["where"] == where:
                    existing["count"] += count
                    existing["message"] = message
                    if cost is not None:
                        existing["cost"] = cost
                    return existing
            entry = {"kind": kind, "message": message, "where": where, "count": count, "cost": cost, "fix": fix}
            self.findings.append(entry)
            return entry

    @property
    def status(self):
        if self.disabled_reason is not None:
            return "disabled"
        statuses = [t["status"] for t in self.targets.values()]
        for status in _RANK:
            if status in statuses:
                return status
        return "not-imported"

    @property
    def reason(self):
        if self.disabled_reason is not None:
            return self.disabled_reason
        status = self.status
        reasons = [f"{name}: {t['reason']}" for name, t in self.targets.items() if t["status"] == status and t["reason"]]
        return "; ".join(reasons)

    def as_dict(self) -> PatchData:
        with self._lock:
            out = {"status": self.status, "reason": self.reason, "summary": self.summary, "docs": self.docs,
                   "distribution": self.distribution, "version": self.version, "origin": self.origin,
                   "targets": {k: dict(v) for k, v in self.targets.items()}, "counters": dict(self.counters),
                   "notes": list(self.notes), "findings": [dict(f) for f in self.findings]}
            if self.observed is not None:
                out["observed"] = dict(self.observed)
            return out


class Receipt:
    def __init__(self):
        self.records = {}
        self.mode = None
        self.strict = False

    def record(self, name, **fields):
        if name not in self.records:
            self.records[name] = PatchRecord(name, **fields)
        return self.records[name]

    def as_dict(self) -> ReceiptData:
        import os
        import sys
        torch = sys.modules.get("torch")
        return {"schema": SCHEMA, "pid": os.getpid(), "mode": self.mode, "strict": self.strict,
                "python": sys.version.split()[0], "torch": getattr(torch, "__version__", None),
                "patches": {name: rec.as_dict() for name, rec in self.records.items()}}

    def summary_lines(self):
        lines = []
        for name, rec in self.records.items():
            counters = ", ".join(f"{k}={v}" for k, v in rec.counters.items())
            line = f"{name}: {rec.status}"
            if rec.reason:
                line += f" ({rec.reason})"
            if counters:
                line += f" [{counters}]"
            if rec.findings:
                line += f" {len(rec.findings)} finding(s)"
            lines.append(line)
        return lines

    def write(self, path):
        import json
        import os
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.as_dict(), f, indent=2, default=str)
        os.replace(tmp, path)
