"""The report of the observe-only mode: units of a cost, and the findings table (detect mode's own at exit, and
`python -m shims doctor`'s, which adds the findings of child processes). It only reads receipt dictionaries and
imports nothing from shims, so both the detectors and the doctor CLI use it without importing each other.
"""

from __future__ import annotations

import os
import sys

_TABLE_CLAIMED = False


def claim_table():
    """The doctor CLI prints the table at exit (with child processes' findings): detect mode does not print its own."""
    global _TABLE_CLAIMED
    _TABLE_CLAIMED = True


def table_claimed():
    return _TABLE_CLAIMED


# ---------------------------------------------------------------- units of a cost

def median(values):
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def size(nbytes):
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def ms(seconds):
    if seconds < 1e-4:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


# ---------------------------------------------------------------- the table

def _shown_place(where):
    """A finding's place, relative to the working directory when it is under it (the JSON keeps it as recorded)."""
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


def _rows(receipt, pid=None):
    rows = []
    for name, rec in receipt.get("patches", {}).items():
        for finding in rec.get("findings", ()):
            rows.append((name, pid, finding))
    return rows


def _unobserved(receipt):
    """Lines for what could not be observed: records in error, and detectors this torch cannot support (refused)."""
    lines = []
    for name, rec in receipt.get("patches", {}).items():
        if rec.get("status") == "error":
            lines.append(f"  {name}: {rec['status']}: {rec['reason']}")
        if name == "detect":
            lines.extend(f"  {name}: {target}: {state['reason']}"
                         for target, state in rec.get("targets", {}).items() if state.get("status") == "skipped")
    return lines


def format_table(receipt, children=()):
    """The findings of a receipt dict (and of the receipts of child processes) as plain-text lines."""
    rows = _rows(receipt)
    for child in children:
        rows.extend(_rows(child, child.get("pid")))
    problems = _unobserved(receipt)
    if not rows:
        lines = ["shims doctor: no findings."]
    else:
        processes = len({pid for _, pid, _ in rows})
        kinds = [f["kind"] if name == "detect" else f"{name}:{f['kind']}" for name, _, f in rows]
        width = max(len(k) for k in kinds)
        lines = [f"shims doctor: {len(rows)} finding(s)" + (f" in {processes} processes" if processes > 1 else ""),
                 f"  {'#':>2}  {'kind':<{width}} {'count':>6}  where"]
        for number, ((name, pid, f), kind) in enumerate(zip(rows, kinds), 1):
            place = _shown_place(f.get("where")) + (f" (pid {pid})" if pid is not None else "")
            lines.append(f"  {number:>2}  {kind:<{width}} {f['count']:>6}  {place}")
            lines.append(f"      {f['message']}")
            if f.get("cost"):
                lines.append(f"      cost: {f['cost']}")
            if f.get("fix"):
                lines.append(f"      fix:  {f['fix']}")
    if problems:
        lines.append("shims could not observe everything:")
        lines.extend(problems)
    return lines


def print_findings(receipt, children=(), report=None, out=None):
    out = out or sys.stderr
    lines = format_table(receipt, children)
    if report:
        lines.append(f"JSON report: {report}")
    out.write("\n" + "\n".join(lines) + "\n")
    out.flush()


def child_reports(report, since):
    """Receipts that processes started by this run wrote beside `report` (`name.<pid>.json`), newest run only."""
    import glob
    import json
    root, ext = os.path.splitext(report)
    found = []
    for path in sorted(glob.glob(f"{glob.escape(root)}.*{ext}")):
        middle = path[len(root) + 1:len(path) - len(ext)]
        if not middle.isdigit() or int(middle) == os.getpid():
            continue
        try:
            if os.path.getmtime(path) < since:
                continue  # left by an earlier run
            with open(path) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue
    return found
