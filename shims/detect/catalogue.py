"""The table of docs/detect.md's "What is detected", generated from the detectors' own text (each Detector's `docs`:
kind -> (what, count, cost, fix)), so that a detector and its documentation are one edit.

    python -m shims.detect.catalogue            # print the table
    python -m shims.detect.catalogue --write    # rewrite it in docs/detect.md, between the markers

tests/detect/test_catalogue_docs.py keeps the page equal to the detectors.
"""

from __future__ import annotations

import os
import sys

BEGIN = "<!-- detectors table: generated from each detector's `docs` by `python -m shims.detect.catalogue --write` -->"
END = "<!-- end of the generated detectors table -->"
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "detect.md")


def table():
    """The markdown table: one row per kind, detectors in the order they are installed."""
    from shims import detect
    lines = ["| kind | what | count | cost | fix |", "|---|---|---|---|---|"]
    for cls in detect.detector_classes():
        for kind in cls.kinds:
            what, count, cost, fix = cls.docs[kind]
            lines.append(f"| `{kind}` | {what} | {count} | {cost} | {fix} |")
    return "\n".join(lines)


def page_table(text):
    """The generated part of the page's text (between the markers)."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def write(path=PAGE):
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    else:
        print(table())
