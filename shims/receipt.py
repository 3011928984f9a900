"""The receipt: what each patch did in this process, and why. `shims.status()` returns `Receipt.as_dict()`.

Statuses of a target (and of a patch: the most telling of its targets' statuses):
    applied         the replacement is in place (fix mode), or the observer is installed (detect mode)
    not-imported    the target's module (or the script's function) has not appeared yet
    skipped         it could not apply: version out of range, fingerprint drift, shape not recognised (the reason says)
    fixed-upstream  the installed version already has the upstream fix; nothing to do
    disabled        turned off by SHIMS_PATCHES / SHIMS_DISABLE / SHIMS_MODE=off
    error           the patch raised; the target was left as it was (strict mode raises instead)
    reverted        shims.disable() put the original back
The JSON layout is documented in docs/detect.md ("The JSON report"); the statuses are the same in both modes.
"""

from __future__ import annotations

import threading

SCHEMA = 1
_RANK = ("error", "applied", "skipped", "fixed-upstream", "reverted", "not-imported", "disabled")


class PatchRecord:
    """What one patch did: per-target status, counters, notes and (detect mode) findings."""

    def __init__(self, name, summary="", docs="", distribution=None):
        self.name, self.summary, self.docs, self.distribution = name, summary, docs, distribution
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

    def as_dict(self):
        with self._lock:
            out = {"status": self.status, "reason": self.reason, "summary": self.summary, "docs": self.docs,
                   "distribution": self.distribution, "version": self.version,
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

    def as_dict(self):
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
