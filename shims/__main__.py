"""The command line: `python -m shims {run,doctor,list,status} ...`."""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m shims COMMAND [ARGS]

commands:
  run SCRIPT [ARGS...]      run SCRIPT as `python SCRIPT ARGS` would, with the patches enabled
                            (processes it starts -- spawn children, DataLoader workers, torchrun workers -- too)
  doctor [--profile N] [--fail-on KINDS] [--sarif PATH] [--html PATH] SCRIPT [ARGS...]
                            run SCRIPT unchanged in observe-only mode (SHIMS_MODE=detect) and print what shims
                            found at exit: each mistake, where, how often, its cost, and the fix;
                            --profile N: also torch.profiler over N optimizer steps after 2 warm-up steps (the top
                            operators table, and a Chrome/Perfetto trace beside the JSON report);
                            --fail-on KINDS|any: exit 1 when such a finding is made (the script's failure wins);
                            --sarif PATH, --html PATH: the report as SARIF 2.1.0, as a self-contained web page
  list                      every patch: target, supported versions, installed version, whether it would apply
  help                      this text

environment (read once, at start; a bad name or value is an error that names the valid choices):
  SHIMS_PATCHES   all (default) | none | comma list of patch names
  SHIMS_DISABLE   comma list of patch names to leave out
  SHIMS_MODE      fix (default) | detect | off
  SHIMS_STRICT    0 (default) | 1: a patch that cannot apply raises instead of being skipped
  SHIMS_REPORT    path of the JSON receipt written at exit ({pid} is replaced by the process id)
  SHIMS_LOG       DEBUG | INFO | WARNING | ERROR | CRITICAL: level of the `shims` logger (stderr)
  SHIMS_PROFILE_STEPS   N: in detect mode, profile N optimizer steps (what doctor's --profile N sets)
  SHIMS_IGNORE    detect mode: findings to suppress, comma list of kind@file:line
  SHIMS_<PATCH>_<OPTION>   per-patch options: `python -m shims list` shows them
"""


def _list(out=sys.stdout):
    from shims import config, registry, versions
    patches = registry.load()
    try:
        cfg = config.from_environment(patches)
        why_off = cfg.why_off
    except Exception as exc:  # noqa: BLE001 - list must still work with a broken environment, and say so
        cfg, why_off = None, {}
        out.write(f"note: the environment does not parse: {exc}\n\n")
    for patch in patches:
        options = cfg.options[patch.name] if cfg else {o.name: o.default for o in patch.options}
        targets = patch.resolve_targets(options)
        out.write(f"{patch.name}: {patch.summary}\n")
        out.write(f"  targets:    {', '.join(str(t) for t in targets)}\n")
        torch_here = versions.installed("torch")
        verdicts = []
        # each target's ranges (targets with the same ranges share a line): the framework or user code, the release
        # that fixed it upstream, torch
        groups = {}
        for target in targets:
            groups.setdefault(target.ranges(patch), []).append(target)
        for (distribution, supported, fixed_in, torch_range), members in groups.items():
            if distribution is None:
                what = "user code (no version check: the function's shape decides)"
                verdict = None
            else:
                installed = versions.installed(distribution)
                what = (f"{distribution} {supported or 'any version'}"
                        f"{'; fixed upstream in ' + fixed_in if fixed_in else '; not fixed upstream'}; "
                        f"installed: {installed or 'not installed'}")
                verdict = (f"{distribution} is not installed here" if installed is None
                           else versions.verdict(patch, installed, distribution, supported, fixed_in))
                verdict = verdict[1] if isinstance(verdict, tuple) else verdict
            if verdict is None and distribution != "torch":
                found = versions.torch_verdict(torch_range, torch_here)
                verdict = found[1] if found else None
            if distribution != "torch":
                what += f"; torch {torch_range or 'any'} (installed: {torch_here or 'not installed'})"
            names = ", ".join(str(t) for t in members)
            out.write(f"  {'versions:' if len(groups) == 1 else names + ':'}   {what}\n")
            verdicts.extend([verdict] * len(members))
        if patch.upstream:
            out.write(f"  upstream:   {patch.upstream}\n")
        if why_off.get(patch.name):
            would = f"no: {why_off[patch.name]}"
        elif verdicts and all(v is not None for v in verdicts):
            would = "no: " + "; ".join(dict.fromkeys(verdicts))
        else:
            would = "yes, when its target is imported (after a fingerprint check)"
            refused = [v for v in verdicts if v is not None]
            if refused:
                would += "; not where " + "; ".join(dict.fromkeys(refused))
        out.write(f"  would apply: {would}\n")
        for option in patch.options:
            var = f"SHIMS_{patch.name.upper()}_{option.name}"
            shown = options.get(option.name)
            shown = ",".join(shown) if isinstance(shown, (list, tuple)) else shown
            choices = f" [{' | '.join(option.choices)}]" if option.choices else ""
            out.write(f"  {var}={shown}{choices}  {option.help}\n")
        if patch.docs:
            out.write(f"  docs:       {patch.docs}\n")
        out.write("\n")
    for name, problem in registry.broken().items():
        out.write(f"{name}: BROKEN: {problem}\n\n")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from shims.errors import ShimsConfigError
    try:
        if command == "list":
            return _list()
        if command == "doctor":
            from shims import doctor
            return doctor.main(rest)  # doctor.add_arguments / apply / exit_status
        if command == "run":
            usage = f"usage: python -m shims {command} SCRIPT [ARGS...]"
            if not rest or rest[0].startswith("-"):
                sys.stderr.write(f"shims {command}: expected a script path, got {rest[0] if rest else 'nothing'}\n"
                                 f"{usage}\n")
                return 2
            from shims import runner
            runner.run_script(rest[0], rest[1:])
            return 0
    except ShimsConfigError as exc:
        sys.stderr.write(f"shims: configuration error: {exc}\n")
        return 2
    sys.stderr.write(f"shims: unknown command {command!r}; valid: run, doctor, list, help\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
