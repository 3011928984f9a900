"""`python -m shims doctor --sarif PATH`: the report as SARIF 2.1.0, for GitHub code scanning and editors.

One rule per kind found (its id the kind, its help the kind's description and the fix, its helpUri the detect docs),
one result per finding at file:line (paths under the working directory relative to %SRCROOT%), the user's line that
reached a framework line as a related location, the numeric cost in the result's properties. Suppressed findings
are results with a suppression (inSource for a `# shims: ignore[...]` comment, external for SHIMS_IGNORE), so viewers
count them without showing them. tests/detect/test_report_formats.py validates the output against the 2.1.0 schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
COST_FIELDS = ("per", "basis", "seconds_each", "seconds_per_step", "step_share", "seconds_once", "bytes")


def docs_uri(kind):
    """The detect docs for a kind: the page in this checkout when shims runs from one (a file: URI), else its path
    in the source distribution."""
    page = Path(__file__).resolve().parents[2] / "docs" / "detect.md"
    anchor = "#what-is-detected"
    return (page.as_uri() if page.is_file() else "docs/detect.md") + anchor


def _location(where, root):
    path, _, line = (where or "").rpartition(":")
    if not path or not line.isdigit():
        return None
    absolute = os.path.abspath(path)
    artifact = {"uri": Path(absolute).as_uri()}
    relative = os.path.relpath(absolute, root) if absolute.startswith(os.path.join(root, "")) else None
    if relative:
        artifact = {"uri": Path(relative).as_posix(), "uriBaseId": "%SRCROOT%"}
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": int(line)}}}


def _rule_name(kind):
    return "".join(part.capitalize() for part in kind.replace(":", "-").split("-"))


def build(report, descriptions, version, root=None):
    """The SARIF log (a dict) of `report` (results.Report). descriptions: kind -> what it means."""
    root = os.path.abspath(root or os.getcwd())
    everything = list(report.findings) + list(report.suppressed)
    rules, index = [], {}
    for f in everything:
        if f.kind in index:
            continue
        index[f.kind] = len(rules)
        what = descriptions.get(f.kind) or descriptions.get(f.name) or f.message
        help_text = what + (f"\nFix: {f.fix}" if f.fix else "") + (f"\nOr: {f.alternative}" if f.alternative else "")
        rules.append({"id": f.kind, "name": _rule_name(f.kind), "shortDescription": {"text": what},
                      "fullDescription": {"text": what}, "help": {"text": help_text}, "helpUri": docs_uri(f.kind),
                      "defaultConfiguration": {"level": "warning"}})
    results = []
    for f in everything:
        location = _location(f.where, root)
        text = f.message + (f" Cost: {f.cost}." if f.cost else "") + (f" Fix: {f.fix}" if f.fix else "")
        result = {"ruleId": f.kind, "ruleIndex": index[f.kind], "level": "warning", "message": {"text": text},
                  "locations": [location] if location else [],
                  "properties": {"count": f.count, **{k: getattr(f, k) for k in COST_FIELDS}}}
        related = _location(f.user_where, root) if f.user_where else None
        if related:
            related.update(id=0, message={"text": f"the call that reached {f.framework or 'the framework'}"})
            result["relatedLocations"] = [related]
        if f.suppressed:
            source = "inSource" if f.suppressed.startswith("`") else "external"
            result["suppressions"] = [{"kind": source, "justification": f.suppressed}]
        results.append(result)
    run = {"tool": {"driver": {"name": "shims doctor", "version": version, "rules": rules}},
           "originalUriBaseIds": {"%SRCROOT%": {"uri": Path(root).as_uri() + "/"}},
           "results": results,
           "properties": {"summary": report.summary}}
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def write(path, report, descriptions, version):
    with open(path, "w") as f:
        json.dump(build(report, descriptions, version), f, indent=2)
