"""`python -m shims list [PATCH] [--json]`: what each patch would do here, with this environment.

The facts come from where the run takes them: the configuration from shims/config.py (a configuration that does not
parse is said, as a run would stop on it), each target's verdict from `versions.target_verdict` (the engine's own
check before it patches), the mode (detect and off patch nothing).
"""

from __future__ import annotations

import json
import os

from shims import config, registry, versions
from shims.receipt import docs_url

SCHEMA = 1


def wrap(text, width, indent="", hanging="    "):
    """One logical line wrapped to `width`, continuation lines indented by `hanging` more than the first."""
    import textwrap
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent + hanging,
                         break_long_words=False, break_on_hyphens=False) or indent


def _environment():
    """(Config or None, error text or None)."""
    from shims.errors import ShimsConfigError
    try:
        return config.from_environment(registry.load(import_plugins=True)), None
    except ShimsConfigError as exc:
        return None, str(exc)


def _target_facts(patch, target):
    distribution, supported, fixed_in, torch_range = target.ranges(patch)
    installed = versions.installed(distribution) if distribution else None
    verdict = versions.target_verdict(patch, target)
    if verdict is not None:
        applies, why = False, verdict[1]
    elif distribution and installed is None:
        applies, why = False, f"{distribution} is not installed here"
    else:
        applies, why = True, ("versions fit: patched when its module is imported, after a fingerprint check"
                              if distribution or target.module != "__main__"
                              else "patched when the script defines it, after a fingerprint check")
    return {"target": str(target), "distribution": distribution, "supported": supported or None,
            "fixed_in": fixed_in, "installed": installed, "torch": torch_range or None,
            "verdict": None if verdict is None else {"status": verdict[0], "reason": verdict[1]},
            "would_apply": applies, "why": why}


def describe(patch, cfg, error):
    """Everything `list` says about one patch, as data (the JSON output; the text is made from it)."""
    options = cfg.options[patch.name] if cfg else {o.name: o.default for o in patch.options}
    targets = [_target_facts(patch, t) for t in patch.resolve_targets(options)]
    if error:
        would = "no: the environment does not parse (a run stops with exit status 2 and patches nothing)"
    elif cfg.why_off.get(patch.name):
        would = f"no: {cfg.why_off[patch.name]}"
    elif cfg.mode == "detect":
        would = "no: SHIMS_MODE=detect observes and reports, and changes nothing"
    elif any(t["would_apply"] for t in targets):
        here = sum(t["would_apply"] for t in targets)
        would = f"yes, as its targets appear ({here} of {len(targets)} can apply here)"
    else:
        would = "no: " + "; ".join(dict.fromkeys(t["why"] for t in targets))
    shown_options = {}
    for option in patch.options:
        var = f"SHIMS_{patch.name.upper()}_{option.name}"
        value = options.get(option.name)
        shown_options[var] = {"value": list(value) if isinstance(value, tuple) else value,
                              "set": cfg is not None and var in cfg.source,
                              "values": config.option_values(option).replace("`", ""), "help": option.help}
    return {"name": patch.name, "summary": patch.summary, "from": registry.origin(patch), "would_apply": would,
            "targets": targets,
            "upstream": patch.upstream or None, "options": shown_options, "docs": docs_url(patch.docs) or None}


def collect(only=None):
    cfg, error = _environment()
    patches = [p for p in registry.load(import_plugins=True) if only is None or p.name == only]
    environment = {"parses": error is None, "error": error, "mode": cfg.mode if cfg else None,
                   "variables": {name: os.environ.get(name) for name in config.GLOBAL_VARS}}
    return {"schema": SCHEMA, "environment": environment,
            "patches": [describe(p, cfg, error) for p in patches],
            "broken": {n: why for n, why in registry.broken().items() if only is None or n == only}}


def _ranges(fact):
    if fact["distribution"] is None:
        text = "user code, no version check (the function's shape decides)"
    else:
        text = (f"{fact['distribution']} {fact['supported'] or 'any version'}; "
                + (f"fixed upstream in {fact['fixed_in']}; " if fact["fixed_in"] else "not fixed upstream; ")
                + f"installed: {fact['installed'] or 'not installed'}")
    if fact["distribution"] != "torch":
        text += f"; torch {fact['torch'] or 'any'}"
    return text


def format_text(data, width):
    lines = []
    env = data["environment"]
    if not env["parses"]:
        lines.append(wrap(f"environment: does not parse: {env['error']}. A run with it stops with exit status 2 "
                          "and patches nothing; below, what each patch is, with its default options.", width))
    else:
        set_vars = ", ".join(f"{k}={v}" for k, v in env["variables"].items() if v is not None)
        mode = {"fix": "fix (patches apply as their targets are imported)",
                "detect": "detect (observe only: nothing is patched)", "off": "off (nothing is patched)"}[env["mode"]]
        lines.append(wrap(f"mode: {mode}; set: {set_vars or 'no SHIMS_* variable (the defaults)'}", width))
    lines.append("")
    for patch in data["patches"]:
        lines.append(wrap(f"{patch['name']}: {patch['summary']}", width))
        lines.append(wrap(f"from: {patch['from']}", width, indent="  "))
        lines.append(wrap(f"would apply: {patch['would_apply']}", width, indent="  "))
        groups = {}
        for fact in patch["targets"]:
            key = (_ranges(fact), fact["why"] if fact["would_apply"] else "not here: " + fact["why"])
            groups.setdefault(key, []).append(fact["target"])
        for (ranges, verdict), names in groups.items():
            lines.append(wrap(f"{', '.join(names)}: {ranges}; {verdict}", width, indent="  "))
        if patch["upstream"]:
            lines.append(wrap(f"upstream: {patch['upstream']}", width, indent="  "))
        for var, option in patch["options"].items():
            value = option["value"]
            value = ", ".join(value) if isinstance(value, list) else value  # spaces: the line can wrap
            origin = "set" if option["set"] else "default"
            lines.append(wrap(f"{var}={value} ({origin}; {option['values']}): {option['help']}", width,
                              indent="  "))
        if patch["docs"]:
            lines.append(wrap(f"docs: {patch['docs']}", width, indent="  "))
        lines.append("")
    for name, problem in data["broken"].items():
        lines.append(wrap(f"{name}: BROKEN: {problem}", width))
        lines.append("")
    return "\n".join(lines)


def show(only, as_json, out, width):
    """Print the list; 2 for an unknown PATCH (the error names the valid ones)."""
    import sys
    names = [p.name for p in registry.load(import_plugins=True)] + list(registry.broken())
    if only is not None and only not in names:
        sys.stderr.write(f"shims list: unknown patch {only!r}{config._suggest(only, names)}; valid: "
                         f"{', '.join(names)}\n")
        return 2
    data = collect(only)
    if as_json:
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        out.write(format_text(data, width))
    out.flush()
    return 0
