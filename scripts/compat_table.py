"""The matrix table from the junit files that `nox` (noxfile.py) leaves in .nox/results: one row per combination.

    python3 scripts/compat_table.py .nox/results                                  # print the table
    python3 scripts/compat_table.py .nox/results --write docs/compatibility.md    # and put it between the markers

Standard library only (runs with any python3). A combination whose junit file is missing (pytest crashed or never
started) is listed as such, never left out.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

BEGIN, END = "<!-- matrix-table:begin -->", "<!-- matrix-table:end -->"
FRAMEWORKS = ("python-doctr", "rfdetr", "ultralytics", "yolov5", "colossalai", "pytorch-lightning", "transformers",
              "accelerate")


def version_key(text):
    return tuple(int(part) for part in re.findall(r"\d+", text or "0")[:3])


def read_combination(results, name):
    """Counts, failing test ids and skip reasons of one combination, from <name>.xml and <name>.json."""
    row = {"name": name, "versions": {}, "ran": False}
    meta = os.path.join(results, f"{name}.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            row["versions"] = json.load(f)
    junit = os.path.join(results, f"{name}.xml")
    if not os.path.isfile(junit):
        return row
    root = ET.parse(junit).getroot()
    counts = collections.Counter()
    failures, skips = [], collections.Counter()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "").replace("\n", " ")
            skips[re.sub(r"^(Skipped: )?", "", reason)[:160]] += 1
        else:
            counts["passed"] += 1
    seconds = sum(float(suite.get("time", 0) or 0) for suite in root.iter("testsuite"))
    finished = datetime.datetime.fromtimestamp(os.path.getmtime(junit), datetime.timezone.utc)
    row.update(ran=True, counts=counts, failures=failures, skips=skips, seconds=seconds,
               finished=finished.strftime("%Y-%m-%d %H:%M UTC"))
    return row


def render(rows):
    lines = ["| combination | Python | torch | frameworks | commit | passed | failed | errors | skipped | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        v = row["versions"]
        frameworks = ", ".join(f"{d} {v[d]}" for d in FRAMEWORKS if d in v) or "-"
        if not row["ran"]:
            lines.append(f"| {row['name']} | {v.get('python', '?')} | {v.get('torch', '?')} | {frameworks} "
                         f"| {v.get('commit', '?')} | no junit file: the run crashed or never started | | | | |")
            continue
        c = row["counts"]
        lines.append(f"| {row['name']} | {v.get('python', '?')} | {v.get('torch', '?')} | {frameworks} | "
                     f"{v.get('commit', '?')} ({row['finished']}) | {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} | {row['seconds']:.0f} s |")
    finished = [row["finished"] for row in rows if row["ran"]]
    if finished:
        tested = sorted({f"{r['versions']['commit']} ({r['versions'].get('tree', '?')})" for r in rows
                         if "commit" in r["versions"]})
        lines += ["", f"Runs finished {min(finished)} to {max(finished)}; shims installed from its wheel in each"
                  + (f"; commit {', '.join(tested)}." if tested else ".")]
    for row in rows:
        if row["ran"] and row["failures"]:
            lines += ["", f"Failed in {row['name']}:"] + [f"- `{test_id}`" for test_id in row["failures"]]
    for row in rows:
        if row["ran"] and row["skips"]:
            lines += ["", f"Skipped in {row['name']}:"]
            lines += [f"- {count} x {reason}" for reason, count in row["skips"].most_common()]
    return "\n".join(lines)


def write_into(doc, table):
    """Replace what stands between the markers of `doc` (appended with its markers when absent)."""
    text = open(doc).read() if os.path.isfile(doc) else "# Compatibility\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the folder with <combination>.xml and <combination>.json")
    parser.add_argument("--write", metavar="DOC", help="put the table between the markers of this Markdown file")
    opts = parser.parse_args(argv)
    names = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(opts.results, "*.json"))}
    names |= {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(opts.results, "*.xml"))}
    if not names:
        print(f"no results in {opts.results}", file=sys.stderr)
        return 1
    rows = [read_combination(opts.results, name) for name in names]
    rows.sort(key=lambda r: (version_key(r["versions"].get("python")), version_key(r["versions"].get("torch"))))
    table = render(rows)
    print(table)
    if opts.write:
        write_into(opts.write, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
