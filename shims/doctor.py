"""`python -m shims doctor SCRIPT ARGS`: run a script unchanged in observe-only mode, then print what was found.

At exit: a table of findings on stderr (kind, count, place; then what happened, its cost and the fix), and the JSON
receipt at SHIMS_REPORT (default `shims-doctor.json` in the working directory; processes the script starts write
`shims-doctor.<pid>.json` beside it, and their findings join the table). docs/detect.md documents both.
"""

from __future__ import annotations

import os
import sys

DEFAULT_REPORT = "shims-doctor.json"
_TABLE_REGISTERED = False


def table_registered():
    """Whether this process prints the doctor table at exit (then detect mode does not print its own)."""
    return _TABLE_REGISTERED


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


def format_table(receipt, children=()):
    """The findings of a receipt dict (and of the receipts of child processes) as plain-text lines."""
    rows = _rows(receipt)
    for child in children:
        rows.extend(_rows(child, child.get("pid")))
    problems = [f"  {name}: {rec['status']}: {rec['reason']}" for name, rec in receipt.get("patches", {}).items()
                if rec.get("status") == "error"]
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


def print_table_at_exit():
    """Called by `python -m shims doctor` before the script runs: default the JSON report, print the table at exit."""
    global _TABLE_REGISTERED
    import atexit
    import time
    started = time.time()
    os.environ.setdefault("SHIMS_REPORT", os.path.abspath(DEFAULT_REPORT))  # absolute: the script may chdir
    _TABLE_REGISTERED = True

    def show():
        try:
            from shims import detectors, engine
            detectors.flush(final=True)
            current = engine.get()
            report = current.report_path()
            if report:
                current.receipt.write(report)  # again: findings written after the engine's own exit handler
            children = child_reports(report, started) if report else []
            print_findings(current.receipt.as_dict(), children, os.path.abspath(report) if report else None)
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] doctor could not print its table: {type(exc).__name__}: {exc}\n")
    atexit.register(show)
