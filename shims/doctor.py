"""`python -m shims doctor SCRIPT ARGS`: run a script unchanged in observe-only mode, then print what was found.

At exit: a table of findings on stderr (kind, count, place; then what happened, its cost and the fix), and the JSON
receipt at SHIMS_REPORT (default `shims-doctor.json` in the working directory; processes the script starts write
`shims-doctor.<pid>.json` beside it, and their findings join the table). docs/detect.md documents both.

`--profile N` (add_arguments, apply) sets SHIMS_PROFILE_STEPS: the profiler is shims/detect/detectors/profile.py.
The doctor only reads results: the receipt of this process (from the engine) and the reports children wrote; the
table's layout is shims.detect.report's. It never imports the detectors: their exit handler, registered when torch is
imported (after this one), runs before it (atexit is last-in, first-out) and has written the final findings.
"""

from __future__ import annotations

import argparse
import os
import sys

from shims.detect import report as detect_report

DEFAULT_REPORT = "shims-doctor.json"

format_table = detect_report.format_table
print_findings = detect_report.print_findings
child_reports = detect_report.child_reports


def table_registered():
    """Whether this process prints the doctor table at exit (then detect mode does not print its own)."""
    return detect_report.table_claimed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's own options, on `python -m shims doctor`'s parser (before the command)."""
    parser.add_argument("--profile", metavar="N", default=None,
                        help="also run torch.profiler over N optimizer steps after 2 warm-up steps: the top "
                             "operators table, and a Chrome/Perfetto trace beside the JSON report")


def apply(ns: argparse.Namespace) -> None:
    """Apply the options before the script runs: `--profile N` reaches the run (and the processes it starts) as
    SHIMS_PROFILE_STEPS. A bad value raises ShimsConfigError naming the option, the value and what is valid."""
    from shims import config
    if ns.profile is not None:
        steps = config.parse_profile_steps(ns.profile, f"--profile {ns.profile!r}")
        os.environ[config.PROFILE_VAR] = str(steps)  # the command line wins over the environment


def exit_status(script_status: int) -> int:
    """The doctor's exit status: the script's own."""
    return script_status


def print_table_at_exit():
    """Called by `python -m shims doctor` before the script runs: default the JSON report, print the table at exit."""
    import atexit
    import time
    started = time.time()
    os.environ.setdefault("SHIMS_REPORT", os.path.abspath(DEFAULT_REPORT))  # absolute: the script may chdir
    detect_report.claim_table()

    def show():
        try:
            from shims import engine
            current = engine.get()
            if current.config is None:
                return  # shims never started (a configuration error, already printed): no table to show
            report = current.report_path()
            if report:
                current.receipt.write(report)  # again: findings written after the engine's own exit handler
            children = child_reports(report, started) if report else []
            print_findings(current.receipt.as_dict(), children, os.path.abspath(report) if report else None)
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] doctor could not print its table: {type(exc).__name__}: {exc}\n")
    atexit.register(show)
