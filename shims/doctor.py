"""`python -m shims doctor [OPTIONS] SCRIPT ARGS`: run a script unchanged in observe-only mode, then report.

    --profile N        torch.profiler over N optimizer steps (shims/detect/profiling.py)
    --fail-on KINDS    exit 1 when a finding of one of these kinds (comma list, or `any`) is made and the script
                       itself succeeded (the script's own failure status always wins)
    --sarif PATH       the findings as SARIF 2.1.0 (shims/detect/sarif.py)
    --html PATH        a self-contained HTML report (shims/detect/html.py)

The command line calls three functions: `add_arguments(parser)`, `apply(ns)` before the script runs, and
`exit_status(script_status)` once it has returned: that builds the report (shims.detect.results: findings of this
process and of the processes it started, merged, suppressions applied, ranked by cost, with a summary of what was
observed), prints the table on stderr, writes SARIF and HTML, and gives the exit status. The JSON receipt
(SHIMS_REPORT, default shims-doctor.json; started processes write shims-doctor.<pid>.json beside it) gets the merged
report under "doctor" at exit. `observe()` is the same in a Python block: `with shims.observe() as report: ...`.
The doctor only reads results: it never imports the detectors (they write their findings; it flushes them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from shims.detect import report as detect_report
from shims.detect import results

DEFAULT_REPORT = "shims-doctor.json"

child_reports = detect_report.child_reports


class _State:
    """The options of this doctor run, and the report once built."""
    fail_on = ()  # kinds, or ("any",)
    sarif = html = script = None
    started = None
    report = None  # results.Report, built once by exit_status (or at exit when the script never returned)
    script_status = None


_STATE = _State()


def table_registered():
    """Whether this process prints the doctor table at exit (then detect mode does not print its own)."""
    return detect_report.table_claimed()


# ---------------------------------------------------------------- the command line

def _profile_steps(text):
    from shims import config
    from shims.errors import ShimsConfigError
    try:
        return config.parse_profile_steps(text, f"--profile {text!r}")
    except ShimsConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def known_kinds():
    """Every kind --fail-on and SHIMS_IGNORE accept: the detectors' kinds (patches' own checks: PATCH:KIND)."""
    from shims import detect
    return dict(detect.kinds())


def parse_fail_on(text):
    """`any` or a comma list of kinds (a detector's kind, or PATCH:KIND for a patch's own check)."""
    from shims import registry
    from shims.errors import ShimsConfigError
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ShimsConfigError(f"--fail-on {text!r}: empty; valid: any, or a comma list of kinds")
    if words == ["any"]:
        return ("any",)
    kinds, patches = known_kinds(), {p.name for p in registry.load()}
    for word in words:
        patch, colon, _ = word.partition(":")
        if word not in kinds and not (colon and patch in patches):
            raise ShimsConfigError(f"--fail-on {text!r}: unknown kind {word!r}; valid: any, or a comma list of "
                                   f"{', '.join(sorted(kinds))}, or PATCH:KIND for a patch's own check "
                                   f"(patches: {', '.join(sorted(patches))})")
    return tuple(words)


def _fail_on(text):
    from shims.errors import ShimsConfigError
    try:
        return parse_fail_on(text)
    except ShimsConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser):
    """The doctor's options, for the `doctor` subcommand's parser (before SCRIPT)."""
    parser.add_argument("--profile", metavar="N", type=_profile_steps, default=None,
                        help="also torch.profiler over N optimizer steps after 2 warm-up steps (the operators "
                             "table, per-step averages, and a Chrome/Perfetto trace beside the JSON report)")
    parser.add_argument("--fail-on", metavar="KINDS", type=_fail_on, default=(),
                        help="exit 1 when a finding of these kinds (comma list, or `any`) is made and the script "
                             "succeeded; the script's own failure status wins")
    parser.add_argument("--sarif", metavar="PATH", default=None, help="write the findings as SARIF 2.1.0")
    parser.add_argument("--html", metavar="PATH", default=None, help="write a self-contained HTML report")


def apply(ns):
    """Before the script runs: detect mode, the profile steps for this process and those it starts, the table at
    exit. Reads ns.profile, ns.fail_on, ns.sarif, ns.html and ns.script (when the parser has it)."""
    from shims import config
    os.environ["SHIMS_MODE"] = "detect"
    if getattr(ns, "profile", None):
        os.environ[config.PROFILE_VAR] = str(ns.profile)  # the command line wins over the environment
    _STATE.fail_on = tuple(getattr(ns, "fail_on", ()) or ())
    _STATE.sarif = os.path.abspath(ns.sarif) if getattr(ns, "sarif", None) else None
    _STATE.html = os.path.abspath(ns.html) if getattr(ns, "html", None) else None
    _STATE.script = getattr(ns, "script", None)
    print_table_at_exit()


def exit_status(script_status):
    """The doctor's exit status once the script has returned with `script_status`: the script's own failure wins;
    else 1 when --fail-on names a kind found (not suppressed), else 0. Prints the table, writes SARIF and HTML."""
    status = script_status if isinstance(script_status, int) else (0 if script_status is None else 1)
    report = _final_report(status)
    if status:
        return status
    if _STATE.fail_on and failing(report, _STATE.fail_on):
        return 1
    return 0


def failing(report, fail_on):
    """The findings of `report` that --fail-on `fail_on` fails on."""
    if "any" in fail_on:
        return list(report.findings)
    return [f for f in report.findings if f.kind in fail_on or f.name in fail_on]


# ---------------------------------------------------------------- the report

def _syntax_error(script):
    if not script or not os.path.isfile(script):
        return None
    try:
        with open(script, "rb") as f:
            compile(f.read(), script, "exec")
    except SyntaxError as exc:
        return f"{script}:{exc.lineno}: {exc.msg}"
    except Exception:  # noqa: BLE001 - unreadable: the runner says so
        return None
    return None


def collect(engine, script_status=None):
    """Flush the detectors, then the Report of this process and the processes it started."""
    detect = sys.modules.get("shims.detect")
    if detect is not None:
        detect.flush(final=True)
    path = engine.report_path()
    if path:
        engine.receipt.write(path)
    missing = detect_report.wait_for_children(path, _STATE.started or 0) if path else {}
    children = child_reports(path, _STATE.started or 0) if path else []
    ignores = getattr(engine.config, "ignores", ())
    report = results.build([engine.receipt.as_dict(), *children], ignores=ignores, script_status=script_status,
                           syntax_error=_syntax_error(_STATE.script) if script_status else None)
    report.problems += tuple(f"pid {pid} started observing but its report is missing: {why}"
                             for pid, why in missing.items())
    if missing:
        report.summary += f"; {len(missing)} more process(es) started observing and wrote no report (below)"
    return report


def _final_report(script_status):
    from shims import engine
    current = engine.get()
    if current.config is None:
        return results.Report(summary="nothing observed: shims did not start (a configuration error, printed above)")
    report = _STATE.report = collect(current, script_status)
    _STATE.script_status = script_status
    path = current.report_path()
    lines = results.format_table(report)
    if _STATE.fail_on and not script_status:
        hits = failing(report, _STATE.fail_on)
        lines.append(f"--fail-on {','.join(_STATE.fail_on)}: " + (f"{len(hits)} finding(s) match: exit status 1"
                                                               if hits else "no finding matches"))
    for kind, writer in (("sarif", _write_sarif), ("html", _write_html)):
        target = getattr(_STATE, kind)
        if target:
            try:
                writer(target, report)
                lines.append(f"{kind.upper()} report: {target}")
            except Exception as exc:  # noqa: BLE001 - the run is over; say why the file is missing
                lines.append(f"{kind.upper()} report not written ({target}): {type(exc).__name__}: {exc}")
    if path:
        lines.append(f"JSON report: {os.path.abspath(path)}")
    sys.stderr.write("\n" + "\n".join(lines) + "\n")
    sys.stderr.flush()
    return report


def _write_sarif(path, report):
    import shims
    from shims.detect import sarif
    sarif.write(path, report, known_kinds(), shims.__version__)


def _write_html(path, report):
    from shims.detect import html
    from shims import engine
    record = engine.get().receipt.records.get(results.DETECT)
    profile = (record.observed or {}).get("profile") if record is not None else None
    html.write(path, report, title=f"shims doctor: {os.path.basename(_STATE.script or 'python')}", profile=profile)


def print_table_at_exit():
    """Before the script runs: default the JSON report; at exit, the table (when exit_status did not print it) and
    the merged report written into the JSON under "doctor". Runs last of the exit handlers (registered first)."""
    import atexit
    _STATE.started = time.time()
    os.environ.setdefault("SHIMS_REPORT", os.path.abspath(DEFAULT_REPORT))  # absolute: the script may chdir
    detect_report.claim_table()

    def at_exit():
        try:
            from shims import engine
            current = engine.get()
            if current.config is None:
                return  # shims never started (a configuration error, already printed)
            report = _STATE.report or _final_report(_STATE.script_status)
            path = current.report_path()
            if path:
                _write_json(path, current.receipt.as_dict(), report)
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] doctor could not write its report: {type(exc).__name__}: {exc}\n")
    atexit.register(at_exit)


def _write_json(path, receipt, report):
    import json
    receipt["doctor"] = report.as_dict()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(receipt, f, indent=2, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the Python API

@contextlib.contextmanager
def observe(patches="none", ignore=()):
    """`with shims.observe() as report: ...` runs the block in observe-only mode; afterwards `report.findings` holds
    the typed findings (results.Finding), `report.summary` what was observed. patches: the patches whose own checks
    run too ("none": the generic detectors only); ignore: extra (kind, file, line) suppressions."""
    import shims
    from shims import engine
    report = results.Report()
    shims.enable(patches=patches, mode="detect")
    try:
        yield report
    finally:
        config = engine.get().config
        shims.disable()
        built = results.build([shims.status()], ignores=tuple(getattr(config, "ignores", ())) + tuple(ignore))
        for name in ("findings", "suppressed", "observed", "summary", "problems", "recoverable_share"):
            setattr(report, name, getattr(built, name))
