"""The command line: `python -m shims {run,doctor,list} ...` (also installed as the `shims` command).

argparse, not click: it is in the standard library, so the command line adds no dependency (installing shims must
change nothing else in the user's environment), and it gives `-h/--help` on every subcommand, `--version` and
usage errors with exit status 2, the conventions of pytest, ddtrace-run and opentelemetry-instrument.
"""

from __future__ import annotations

import argparse
import os
import sys

NOT_A_TTY_WIDTH = 100  # columns when the output is a pipe or a file

COMMAND_HELP = (
    "COMMAND is one of: a script (train.py ARGS, a directory or zip with __main__.py); -m module ARGS; "
    "python train.py ARGS or python -m module ARGS (this interpreter: run here, exactly as Python runs it); or any "
    "program whose Python processes shims then reaches (accelerate launch train.py, torchrun --nproc_per_node 2 "
    "train.py, a shell script). Put -- before a COMMAND that starts with -. A missing script exits with status 2, "
    "as Python does."
)


def output_width(stream=None) -> int:
    """Columns to fill: $COLUMNS, else the terminal's width, else 100 (a pipe or a file)."""
    import shutil
    stream = sys.stdout if stream is None else stream
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        if stream.isatty():
            return max(shutil.get_terminal_size().columns, 40)
    except (AttributeError, ValueError, OSError):
        pass
    return NOT_A_TTY_WIDTH


def _plain(text):
    return text.replace("`", "")


def environment_help(width):
    """The environment variables for --help, generated from shims/config.py (the README's table has the same
    source)."""
    from shims import config, registry
    from shims.listing import wrap
    rows = config.environment_rows(registry.load())
    name_width = min(max(len(row[0]) for row in rows) + 2, 30)
    lines = [wrap("environment variables (read once, at start; a bad name or value is an error naming the valid "
                  "ones):", width, hanging="")]
    for name, values, default, meaning in rows:
        text = f"{_plain(meaning)}. Values: {_plain(values)}; default {_plain(default)}."
        body = wrap(text, width, indent=" " * (name_width + 2), hanging="")
        lines.append(f"  {name.ljust(name_width)}{body[name_width + 2:]}")
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse writes an option that takes the rest of the line as `-m ...`: say what it takes."""

    def _format_action_invocation(self, action):
        if action.nargs == argparse.REMAINDER and action.option_strings:
            return f"{action.option_strings[0]} {action.metavar} [ARGS ...]"
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    """Errors named after the subcommand (`shims doctor: ...`), then the usage, exit status 2."""

    def error(self, message):
        name = "shims " + self.prog.split()[-1] if self.prog.split()[-1] in SUBCOMMANDS else "shims"
        self.exit(2, f"{name}: {message}\n{self.format_usage()}")


SUBCOMMANDS = ("run", "doctor", "list", "help")


def _prog():
    """How the user called us: `shims` (the installed command) or `python -m shims`."""
    first = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "shims" if first in ("shims", "shims.exe") else "python -m shims"


def build_parser(width=None) -> argparse.ArgumentParser:
    import functools
    from shims import __version__
    from shims.listing import wrap
    width = output_width() if width is None else width
    formatter = functools.partial(_Formatter, width=width, max_help_position=30)
    prog = _prog()
    parser = _Parser(prog=prog, formatter_class=formatter, allow_abbrev=False,
                     description=wrap("Patch-in fixes for known, costly mistakes in PyTorch training and evaluation "
                                      "loops. `import shims.auto` as the first line of a script does the same as "
                                      "`run`.", width, hanging=""),
                     epilog=environment_help(width))
    parser.add_argument("--version", action="version",
                        version=f"torch-shims {__version__} (import name shims; Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command_parser(name, summary, extra=""):
        p = sub.add_parser(name, help=summary, formatter_class=formatter, allow_abbrev=False,
                           description="\n\n".join(wrap(t, width, hanging="") for t in (summary + extra, COMMAND_HELP)))
        p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                       help="run a module as `python -m MODULE ARGS` does (the rest are its arguments)")
        p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                       help="what to run, and its arguments (see above)")
        return p

    def usage_of(p, name):
        """`prog NAME [-h] [OPTIONS] [--] COMMAND [ARGS ...]`: argparse would write `-m ...` and `...`."""
        words = []
        for action in p._actions:
            if not action.option_strings or action.dest in ("help", "module"):
                continue
            if action.nargs == 0:
                words.append(f"[{action.option_strings[0]}]")
            else:
                words.append(f"[{action.option_strings[0]} {action.metavar or action.dest.upper()}]")
        # wrapped to the width as argparse wraps its own usage: continuation lines under the first option
        import textwrap
        head = f"{prog} {name} "
        p.usage = textwrap.fill(" ".join(["[-h]", *words, "[--] COMMAND [ARGS ...]"]), width=max(width - 7, 40),
                                initial_indent=head, subsequent_indent=" " * (len(head) + 7),
                                break_long_words=False, break_on_hyphens=False)

    usage_of(command_parser("run", "run COMMAND with the patches enabled, as it runs without shims; the processes it "
                   "starts (spawn children, DataLoader workers, torchrun or accelerate workers) too"), "run")
    from shims import doctor
    doctor_parser = command_parser(
        "doctor", "run COMMAND unchanged in observe-only mode (SHIMS_MODE=detect) and print what "
        "shims found at exit: each mistake, where, how often, its cost and the fix",
        "; the JSON report goes to SHIMS_REPORT (default shims-doctor.json)")
    doctor.add_arguments(doctor_parser)
    usage_of(doctor_parser, "doctor")
    lister = sub.add_parser("list", help="every patch: its targets, the versions here, whether it would apply in "
                            "this environment, and its options", formatter_class=formatter, allow_abbrev=False,
                            description=wrap("Every patch (or PATCH): its targets, the supported and installed "
                                             "versions, whether it would apply with the current environment and mode, "
                                             "and its options with their current values.", width, hanging=""))
    lister.add_argument("patch", nargs="?", metavar="PATCH", help="only this patch")
    lister.add_argument("--json", action="store_true", help="as JSON (the same facts, for scripts)")
    helper = sub.add_parser("help", help="this help, or a command's (help run)", formatter_class=formatter)
    helper.add_argument("topic", nargs="?", choices=[s for s in SUBCOMMANDS if s != "help"], metavar="COMMAND")
    parser._shims_subparsers = sub.choices  # for `help COMMAND`
    return parser


def _command_words(ns):
    """The COMMAND as typed: `-m module ARGS` (argparse hands `-m`'s words and any words after a `--` apart), or
    the words after an optional leading `--`."""
    if ns.module is not None:
        return ["-m", *ns.module, *ns.command]
    words = list(ns.command)
    if words[:1] == ["--"]:
        words = words[1:]
    return words


def _script_status(code):
    """The exit status Python gives SystemExit(code), printing a non-integer code as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def _script_path(words):
    """The script file a COMMAND runs in this process, or None (a module, another program, nothing runnable)."""
    from shims import runner
    try:
        plan = runner.plan(words)
    except Exception:  # noqa: BLE001 - the run itself reports a command it cannot start
        return None
    return plan[1] if plan[0] == "script" else None


def _run(ns, parser):
    from shims import runner
    from shims.errors import ShimsConfigError
    name = ns.subcommand
    words = _command_words(ns)
    usage = parser._shims_subparsers[name].format_usage()
    if not words:
        sys.stderr.write(f"shims {name}: expected a script, -m module, or a command to run\n{usage}")
        return 2
    if name == "doctor":
        from shims import doctor
        ns.script = _script_path(words)  # the report names its syntax error, if any
        try:
            doctor.apply(ns)  # detect mode, its options, the table at exit; a bad value is named before the run
        except ShimsConfigError as exc:
            sys.stderr.write(f"shims {name}: {exc}\n{usage}")
            return 2
    previous_hook = sys.excepthook
    try:
        status = runner.run_command(words, replace_process=(name == "run"))
    except runner.CommandError as exc:
        sys.stderr.write(f"shims {name}: {exc}\n")
        return exc.status
    except ShimsConfigError as exc:
        sys.stderr.write(f"shims {name}: configuration error: {exc}\n")
        return 2
    except SystemExit as exc:
        if name != "doctor":
            raise
        status = _script_status(exc.code)
    except Exception:  # noqa: BLE001 - the script's own, already shown from its first frame (runner)
        if name != "doctor" or sys.excepthook is not runner._quiet_hook:
            raise
        sys.excepthook = previous_hook
        status = 1
    if status < 0:  # a program killed by a signal: the shell's 128 + N
        status = 128 - status
    if name == "doctor":
        from shims import doctor
        return doctor.exit_status(status)
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            ns, unknown = parser.parse_known_args(argv)
            if unknown:  # options before the COMMAND that the subcommand does not have
                sub = parser._shims_subparsers.get(getattr(ns, "subcommand", None), parser)
                sub.error(f"unknown option {unknown[0]!r}; the options are listed by --help, then comes the "
                          "COMMAND (put -- before a COMMAND that starts with -)")
        except SystemExit as exc:  # --help, --version, a usage error: a status, not an exception, for callers
            return exc.code
        if ns.subcommand == "help":
            target = parser._shims_subparsers[ns.topic] if ns.topic else parser
            target.print_help()
            return 0
        if ns.subcommand == "list":
            from shims import listing
            return listing.show(ns.patch, as_json=ns.json, out=sys.stdout, width=output_width())
    except BrokenPipeError:
        return _closed_pipe()
    return _run(ns, parser)


def _closed_pipe():
    """The reader went away (`| head`): stop quietly; Python's own flush at exit must not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
