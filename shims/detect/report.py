"""The report of the observe-only mode: units of a cost, and the findings table (detect mode's own at exit, and
`python -m shims doctor`'s, which adds the findings of child processes; results.py builds both). It only reads receipt
dictionaries and imports nothing from shims outside shims.detect, so both the detectors and the doctor CLI use it
without importing each other.
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

def format_table(receipt, children=(), ignores=()):
    """The findings of a receipt dict (and of the receipts of child processes) as plain-text lines, the summary line
    first (shims.detect.results builds the report: merged, suppressions applied, ranked by cost)."""
    from shims.detect import results
    return results.format_table(results.build([receipt, *children], ignores=ignores))


def print_findings(receipt, children=(), report=None, out=None, ignores=()):
    out = out or sys.stderr
    lines = format_table(receipt, children, ignores)
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


STARTED = ".started"  # beside a child's report: written when its detect mode starts, so the parent knows to wait
CHILD_WAIT = 60.0  # seconds the doctor waits, at most, for processes that started detect mode to write their report


def mark_started(report):
    """In a process started by the run: say, beside the report it will write at exit, that it is observing."""
    try:
        with open(report + STARTED, "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass


def _alive(pid):
    """Whether process `pid` still runs (a zombie, exited but not reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for_children(report, since, timeout=CHILD_WAIT):
    """Wait until every process of this run that started detect mode (its `.started` mark) has written its report,
    or has ended without one, at most `timeout` seconds (Lightning's strategy="ddp" starts rank 1 with
    subprocess.Popen and does not wait for it). Returns {pid: why its report is missing} for the others."""
    import glob
    import time
    root, ext = os.path.splitext(report)
    marks = {}
    for path in glob.glob(f"{glob.escape(root)}.*{ext}{STARTED}"):
        middle = path[len(root) + 1:len(path) - len(ext) - len(STARTED)]
        try:
            if middle.isdigit() and int(middle) != os.getpid() and os.path.getmtime(path) >= since:
                marks[int(middle)] = (path[:-len(STARTED)], os.path.getmtime(path))
        except OSError:
            continue

    def written(pid):
        path, started = marks[pid]
        try:
            return os.path.getmtime(path) >= started
        except OSError:
            return False
    deadline = time.time() + timeout
    pending = {pid for pid in marks if not written(pid)}
    while pending and time.time() < deadline:
        pending = {pid for pid in pending if not written(pid) and _alive(pid)}
        if pending:
            time.sleep(0.1)
    missing = {}
    for pid in sorted(pid for pid in marks if not written(pid)):
        missing[pid] = (f"still running after {timeout:.0f} s" if _alive(pid) else
                        "ended without writing one (killed, or left through os._exit)")
    return missing

