"""`python -m shims doctor`: the findings of the observe-only mode as a table at exit."""

from __future__ import annotations

import sys


def format_table(receipt):
    """The findings of a receipt dict as plain-text lines (one finding a line, then its cost and fix)."""
    rows = []
    for name, rec in receipt["patches"].items():
        for f in rec["findings"]:
            rows.append((name, f))
    if not rows:
        return ["shims doctor: no findings."]
    lines = [f"shims doctor: {len(rows)} finding(s)"]
    for name, f in rows:
        lines.append(f"- [{f['kind']}] {f['message']} (x{f['count']}) at {f['where'] or '?'}")
        if f.get("cost"):
            lines.append(f"    cost: {f['cost']}")
        if f.get("fix"):
            lines.append(f"    fix:  {f['fix']}")
    return lines


def print_table_at_exit():
    import atexit

    def show():
        from shims import engine
        sys.stderr.write("\n".join(format_table(engine.get().receipt.as_dict())) + "\n")
    atexit.register(show)
