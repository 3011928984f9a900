"""The doctor's report, built from receipts: findings merged across processes and ranks, suppressions applied, ranked
by cost, and a summary that says what was observed. Pure Python over receipt dictionaries (no torch): the doctor CLI,
`shims.observe()`, the SARIF and HTML writers all read a `Report`.

    build(receipts, ...)    -> Report (findings: tuple of Finding, ranked; suppressed; observed; summary)
    format_table(report)    the plain-text table (stderr)

Suppressions (each one counted in the report as suppressed, never silently dropped):
    a comment on the finding's line (or on the user's line that reached a framework line):
        `# shims: ignore[eval-with-grad]`, `# shims: ignore[kind-a, kind-b]`, `# shims: ignore` (every kind)
    SHIMS_IGNORE=kind@file:line,... (config.parse_ignores): file is a path or its ending (`train.py`, `src/train.py`)
"""

from __future__ import annotations

import linecache
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

from shims.detect import report as units

DETECT = "detect"  # the receipt record of the generic detectors; other records are patches' own checks
_COMMENT = re.compile(r"#\s*shims:\s*ignore(?:\[([^\]]*)\])?", re.I)
WASTED = ("unused-forward", "eval-with-grad", "dead-forward")  # kinds whose forwards are wasted work (timeline)


@dataclass(frozen=True)
class Finding:
    """One finding: a kind at a place, merged over every process and rank that made it."""

    kind: str  # as the table shows it: the detector's kind, or "patch:kind" for a patch's own check
    where: Optional[str]  # file:line (for framework code: the framework's line)
    count: int
    message: str
    cost: Optional[str] = None  # in words
    fix: Optional[str] = None  # the change to the code
    alternative: Optional[str] = None  # the shims patch that does it for you, when there is one
    per: str = "step"  # step (a cost paid in training steps) | one-time (paid once, e.g. at construction)
    basis: str = "estimate"  # measured (in this run) | estimate (counted, not timed) | canned (a figure not from this run)
    seconds_each: Optional[float] = None
    seconds_per_step: Optional[float] = None
    step_share: Optional[float] = None
    seconds_once: Optional[float] = None
    bytes: Optional[int] = None
    framework: Optional[str] = None
    framework_version: Optional[str] = None
    user_where: Optional[str] = None  # the user's line whose call reached a framework line
    ranks: Tuple[Tuple[str, int], ...] = ()  # (rank or process, count) for every process that made it
    suppressed: Optional[str] = None  # why it is suppressed (the comment, or SHIMS_IGNORE's entry)

    @property
    def name(self):
        return self.kind.rpartition(":")[2]

    def as_dict(self):
        out = asdict(self)
        out["ranks"] = [list(r) for r in self.ranks]
        return out


@dataclass(frozen=True)
class Observed:
    optimizer_steps: int = 0
    forwards: int = 0
    eval_forwards: int = 0
    evaluations: int = 0
    backwards: int = 0
    step_seconds: Optional[float] = None
    processes: Tuple[str, ...] = ()  # "rank N" or "pid N" of every process that imported torch in detect mode
    torch_imported: bool = False
    timeline: Tuple[tuple, ...] = ()  # (kind, start, end, where) of the first process that trained
    timeline_dropped: int = 0


@dataclass
class Report:
    findings: Tuple[Finding, ...] = ()
    suppressed: Tuple[Finding, ...] = ()
    observed: Observed = field(default_factory=Observed)
    summary: str = "nothing observed yet"
    problems: Tuple[str, ...] = ()  # what could not be observed (detectors refused or failed)
    recoverable_share: Optional[float] = None

    def as_dict(self):
        return {"summary": self.summary, "recoverable_share": self.recoverable_share,
                "observed": {k: v for k, v in asdict(self.observed).items() if k != "timeline"},
                "findings": [f.as_dict() for f in self.findings],
                "suppressed": [f.as_dict() for f in self.suppressed], "problems": list(self.problems)}


# ---------------------------------------------------------------- building

def _process_label(receipt):
    observed = receipt.get("patches", {}).get(DETECT, {}).get("observed") or {}
    rank = observed.get("rank")
    return f"rank {rank}" if rank is not None else f"pid {receipt.get('pid')}"


def _merge(receipts):
    merged = {}  # (kind, where) -> dict of fields, per-process counts
    for receipt in receipts:
        label = _process_label(receipt)
        for name, record in receipt.get("patches", {}).items():
            for f in record.get("findings", ()):
                kind = f["kind"] if name == DETECT else f"{name}:{f['kind']}"
                key = (kind, f.get("where"))
                entry = merged.get(key)
                if entry is None:
                    entry = merged[key] = {k: v for k, v in f.items() if k in Finding.__dataclass_fields__}
                    entry.update(kind=kind, count=0, ranks={})
                    if name != DETECT and "basis" not in f:
                        entry["basis"] = "canned" if f.get("cost") else "estimate"
                        if f.get("fix") and "SHIMS_" in f["fix"]:
                            entry["alternative"], entry["fix"] = f["fix"], None
                else:  # the costliest rank's numbers: the ranks wait for the slowest at each all-reduce
                    for number in ("seconds_per_step", "step_share", "bytes", "seconds_once"):
                        if f.get(number) is not None and (entry.get(number) or 0) < f[number]:
                            entry[number] = f[number]
                entry["count"] += f.get("count", 0)
                entry["ranks"][label] = entry["ranks"].get(label, 0) + f.get("count", 0)
    return merged


def _suppression(finding, ignores):
    """Why `finding` is suppressed (None if it is not): a `# shims: ignore[...]` comment or a SHIMS_IGNORE entry."""
    for place in (finding.where, finding.user_where):
        if not place:
            continue
        path, _, line = place.rpartition(":")
        if not line.isdigit():
            continue
        text = linecache.getline(path, int(line))
        match = _COMMENT.search(text)
        if match:
            listed = [k.strip() for k in (match.group(1) or "").split(",") if k.strip()]
            if match.group(1) is None or finding.kind in listed or finding.name in listed:
                return f"`{match.group(0).strip()}` at {place}"
        for kind, file, number in ignores:
            if number == int(line) and kind in (finding.kind, finding.name, "any") and _same_path(path, file):
                return f"SHIMS_IGNORE={kind}@{file}:{number}"
    return None


def _same_path(path, given):
    path, given = path.replace(os.sep, "/"), given.replace(os.sep, "/")
    return path == given or os.path.abspath(given).replace(os.sep, "/") == path or path.endswith("/" + given)


def rank_key(finding):
    """Costliest first: measured per-step time, then memory held, then one-time costs, then the rest."""
    if finding.per != "one-time" and finding.seconds_per_step is not None:
        return (0, -finding.seconds_per_step)
    if finding.per != "one-time" and finding.bytes:
        return (1, -finding.bytes)
    if finding.per != "one-time":
        return (2, -finding.count)
    return (3, -(finding.seconds_once or 0))


def _observed(receipts):
    totals = dict(optimizer_steps=0, forwards=0, eval_forwards=0, evaluations=0, backwards=0)
    processes, steps, timeline, dropped, torch_imported = [], [], (), 0, False
    for receipt in receipts:
        torch_imported = torch_imported or bool(receipt.get("torch"))
        observed = receipt.get("patches", {}).get(DETECT, {}).get("observed")
        if not observed:
            continue
        processes.append(_process_label(receipt))
        for key in totals:
            totals[key] += observed.get(key) or 0
        if observed.get("step_seconds"):
            steps.append(observed["step_seconds"])
        events = observed.get("timeline", {}).get("events") or ()
        if not timeline and events and observed.get("optimizer_steps"):
            timeline, dropped = tuple(tuple(e) for e in events), observed["timeline"].get("dropped", 0)
    if not timeline:  # no process trained: the first one that ran forwards
        for receipt in receipts:
            line = (receipt.get("patches", {}).get(DETECT, {}).get("observed") or {}).get("timeline") or {}
            if line.get("events"):
                timeline, dropped = tuple(tuple(e) for e in line["events"]), line.get("dropped", 0)
                break
    return Observed(step_seconds=max(steps) if steps else None, processes=tuple(processes),
                    torch_imported=torch_imported, timeline=timeline, timeline_dropped=dropped, **totals)


def _problems(receipts):
    lines = []
    for receipt in receipts[:1]:
        for name, rec in receipt.get("patches", {}).items():
            if rec.get("status") == "error":
                lines.append(f"{name}: {rec['status']}: {rec['reason']}")
            if name == DETECT:
                lines.extend(f"{name}: {target}: {state['reason']}"
                             for target, state in rec.get("targets", {}).items() if state.get("status") == "skipped")
    return tuple(lines)


def build(receipts, ignores=(), script_status=None, syntax_error=None):
    """The Report of a run from its receipts (this process's first, then its children's). `ignores`: SHIMS_IGNORE's
    (kind, file, line) entries; `script_status`: the script's exit status when known; `syntax_error`: the message
    when the script could not be compiled."""
    receipts = [r for r in receipts if r]
    findings, suppressed = [], []
    for entry in _merge(receipts).values():
        ranks = tuple(sorted(entry.pop("ranks").items()))
        found = Finding(ranks=ranks, **{k: v for k, v in entry.items() if k in Finding.__dataclass_fields__})
        why = _suppression(found, ignores)
        if why:
            suppressed.append(Finding(**{**asdict(found), "ranks": ranks, "suppressed": why}))
        else:
            findings.append(found)
    findings.sort(key=rank_key)
    observed = _observed(receipts)
    shares = {}
    for f in findings:
        if f.per != "one-time" and f.step_share is not None:
            shares[f.where] = max(shares.get(f.where, 0), f.step_share)
    share = min(1.0, sum(shares.values())) if shares else None
    report = Report(findings=tuple(findings), suppressed=tuple(suppressed), observed=observed,
                    problems=_problems(receipts), recoverable_share=share)
    report.summary = summarize(report, script_status, syntax_error)
    return report


# ---------------------------------------------------------------- the summary

def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"


def summarize(report, script_status=None, syntax_error=None):
    """One line: what was observed, and what was found. "no findings" only when training was observed."""
    o = report.observed
    failed = f"the script failed (exit status {script_status})" if script_status else None
    if syntax_error:
        return f"nothing observed: the script has a syntax error ({syntax_error}); it never ran"
    if not o.processes:
        why = "the script never imported torch" if not o.torch_imported else "detect mode never started"
        return f"nothing observed: {why}" + (f"; {failed}" if failed else "")
    if not (o.optimizer_steps or o.forwards or o.eval_forwards):
        if failed:
            return f"nothing observed: {failed} before its first forward or optimizer step"
        return "nothing observed: torch was imported, but no forward and no optimizer step ran"
    seen = [_plural(o.optimizer_steps, "optimizer step"), _plural(o.forwards, "training forward"),
            _plural(o.backwards, "backward pass"),
            f"{_plural(o.evaluations, 'evaluation')} ({_plural(o.eval_forwards, 'forward')})"]
    ranks = sorted((p for p in o.processes if p.startswith("rank ")), key=lambda p: int(p.split()[1]))
    others = len(o.processes) - len(ranks)
    seen.append(f"on {', '.join(ranks)}" + (f" (and {_plural(others, 'other process')})" if others else "")
                if ranks else _plural(len(o.processes), "process"))
    observed = "observed " + ", ".join(seen)
    quiet = f" ({len(report.suppressed)} suppressed)" if report.suppressed else ""
    if report.findings:
        found = f"{_plural(len(report.findings), 'finding')}{quiet}"
        if report.recoverable_share is not None:
            found += f"; recoverable: about {100 * report.recoverable_share:.0f}% of the step time (measured)"
    elif o.optimizer_steps:
        found = f"no findings{quiet}"
    else:
        found = f"no findings in what was observed{quiet}, but training was not observed (no optimizer step)"
    if not o.optimizer_steps and failed:
        return f"{failed} before its first optimizer step; {observed}; {found}"
    return f"{found}; {observed}" + (f"; {failed}" if failed else "")


# ---------------------------------------------------------------- the table

def shown_place(where):
    """A place relative to the working directory when it is under it (the JSON keeps it as recorded)."""
    if not where:
        return "?"
    path, sep, line = where.rpartition(":")
    if not sep or not os.path.isabs(path):
        return where
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return where
    return where if relative.startswith("..") else f"{relative}:{line}"


def cost_column(f):
    if f.per == "one-time":
        return "one-time"
    if f.step_share is not None:
        return f"{100 * f.step_share:.1f}%/step" if f.step_share >= 0.001 else "<0.1%/step"
    if f.seconds_per_step is not None:
        return f"{units.ms(f.seconds_per_step)}/step"
    if f.bytes:
        return units.size(f.bytes)
    return "-"


BASIS = {"measured": "measured in this run", "estimate": "estimate (counted, not timed)",
         "canned": "canned figure, not measured in this run"}


def format_table(report):
    lines = [f"shims doctor: {report.summary}"]
    if report.findings:
        kinds = [f.kind for f in report.findings]
        width = max(len(k) for k in kinds)
        lines.append(f"  {'#':>2}  {'kind':<{width}} {'count':>6}  {'cost':>11}  where")
        for number, f in enumerate(report.findings, 1):
            lines.append(f"  {number:>2}  {f.kind:<{width}} {f.count:>6}  {cost_column(f):>11}  "
                         f"{shown_place(f.where)}")
            lines.append(f"      {f.message}")
            if f.framework:
                lines.append(f"      in {f.framework} {f.framework_version or '(version unknown)'}, reached from "
                             f"{shown_place(f.user_where)}")
            if f.cost:
                lines.append(f"      cost: {f.cost} [{BASIS.get(f.basis, f.basis)}]")
            if f.fix:
                lines.append(f"      fix:  {f.fix}")
            if f.alternative:
                lines.append(f"      or:   {f.alternative}")
            if len(f.ranks) > 1 and len({c for _, c in f.ranks}) > 1:
                lines.append("      per process: " + " | ".join(f"{p}: {c}" for p, c in f.ranks))
    if report.suppressed:
        lines.append(f"suppressed ({len(report.suppressed)}):")
        lines.extend(f"  {f.kind} x{f.count} at {shown_place(f.where)}: {f.suppressed}" for f in report.suppressed)
    if report.problems:
        lines.append("shims could not observe everything:")
        lines.extend(f"  {p}" for p in report.problems)
    return lines
