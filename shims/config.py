"""Environment -> a frozen, validated configuration. The one module that reads (and, for children, writes) os.environ.

The variables are declared once, in VARIABLES below (and per patch in each patch's `options`): the README's table and
`python -m shims --help` are generated from them (`environment_rows`), and a test keeps the README equal to them.
Variables that start with SHIMS__ (two underscores) are internal: shims sets them for the processes a run starts.
"""

from __future__ import annotations

import os
import re

from shims.errors import ShimsConfigError

MODES = ("fix", "detect", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
PROFILE_VAR = "SHIMS_PROFILE_STEPS"

IGNORE_VAR = "SHIMS_IGNORE"

# name, values, default, meaning: the one description of each variable (README and --help are generated from it)
VARIABLES = (
    ("SHIMS_PATCHES", "`all`, `none`, or a comma list of patch names", "`all`", "which patches run"),
    ("SHIMS_DISABLE", "comma list of patch names", "(empty)", "patches to leave out (applied after `SHIMS_PATCHES`)"),
    ("SHIMS_MODE", "`fix`, `detect`, `off`", "`fix`", "fix; observe and report, change nothing; do nothing"),
    ("SHIMS_STRICT", "`1`/`0` (`true`/`false`, `yes`/`no`, `on`/`off`)", "`0`",
     "a patch that cannot apply raises `shims.ShimsPatchError` instead of being skipped"),
    ("SHIMS_REPORT", "a path (`{pid}` is replaced by the process id)", "(none)",
     "write the JSON receipt there at exit; child processes write `name.<pid>.json`"),
    ("SHIMS_LOG", "`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`", "(warnings only)",
     "level of the `shims` logger (stderr); at `INFO` each process logs one receipt line at exit"),
    (PROFILE_VAR, "a whole number >= 1", "(unset: off)",
     "detect mode: torch.profiler over that many optimizer steps after 2 warm-up steps (what `doctor --profile N` "
     "sets)"),
    (IGNORE_VAR, "comma list of `kind@file:line`", "(empty)",
     "detect mode: findings to suppress, as a `# shims: ignore[kind]` comment on that line would (counted in the "
     "report as suppressed)"),
)
GLOBAL_VARS = tuple(row[0] for row in VARIABLES)
BOOT_VAR = "SHIMS__BOOT"  # set for child processes: their sitecustomize starts shims
PARENT_VAR = "SHIMS__PARENT_PID"  # the pid of the process that first started shims (children write their own report)
_EXPORTED = None  # the SHIMS_* variables as they were before export_for_children wrote over them


class Config:
    """Frozen result of parsing. `patches`: enabled patch names in registry order; `why_off`: name -> reason."""

    __slots__ = ("patches", "why_off", "mode", "strict", "report", "log", "options", "source", "profile_steps",
                 "ignores")

    def __init__(self, **values):
        for key in self.__slots__:
            object.__setattr__(self, key, values[key])

    def __setattr__(self, key, value):
        raise AttributeError("shims configuration is frozen; call shims.enable(...) to change it")

    def as_dict(self):
        return {key: getattr(self, key) for key in self.__slots__}

    def __eq__(self, other):
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    __hash__ = None

    def __repr__(self):
        return f"Config(mode={self.mode!r}, patches={self.patches!r}, strict={self.strict})"


def _suggest(word, choices):
    import difflib  # only on the error path
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _words(text):
    return [w.strip() for w in text.split(",") if w.strip()]


def _where(var, text, shown):
    """How an input is named in an error: the variable (`SHIMS_PATCHES='doctr,nope'`), or the argument of
    `shims.enable` it came from (`shown` maps variable -> that argument's text)."""
    return (shown or {}).get(var) or f"{var}={text!r}"


def _parse_names(var, text, names, allow_all, shown=None):
    where = _where(var, text, shown)
    words = _words(text.lower())
    if allow_all and words in (["all"], ["none"]):
        return list(names) if words == ["all"] else []
    valid = ("all, none, or " if allow_all else "") + "a comma list of: " + ", ".join(names)
    if not words and allow_all:
        raise ShimsConfigError(f"{where} is empty; valid: {valid}")
    for word in words:
        if word not in names:
            if not names:  # every patch module failed to import (shims.patches missing: not installed?)
                from shims import registry
                problems = "; ".join(f"{n}: {p}" for n, p in registry.broken().items()) or "none registered"
                raise ShimsConfigError(f"{where}: no patch could be loaded ({problems}); install shims with "
                                       "pip (patches/ becomes shims.patches) or run from an installed environment")
            raise ShimsConfigError(f"{where}: unknown patch {word!r}{_suggest(word, names)}; valid: {valid}")
    return words


def _parse_choice(var, text, choices, fold=str.lower, shown=None):
    value = fold(text.strip())
    if value not in choices:
        raise ShimsConfigError(f"{_where(var, text, shown)} is not valid{_suggest(value, choices)}; "
                               f"valid: {', '.join(choices)}")
    return value


def _parse_bool(var, text, shown=None):
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ShimsConfigError(f"{_where(var, text, shown)} is not valid; valid: 1, 0, true, false, yes, no, on, off")


def parse_profile_steps(text, shown=None):
    """Optimizer steps to profile: a whole number, 1 or more. `shown` names the input in the error (the variable,
    or doctor's `--profile`); the message says the bad value and what is valid."""
    value = text.strip()
    if value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    shown = shown or f"{PROFILE_VAR}={text!r}"
    raise ShimsConfigError(f"{shown} is not valid; valid: a whole number of optimizer steps to profile, 1 or more "
                           "(e.g. 5; unset: no profiling)")


def parse_ignores(text, shown=None):
    """SHIMS_IGNORE: a comma list of kind@file:line (e.g. eval-with-grad@train.py:88) -> ((kind, file, line), ...).
    The kind is a detector's kind, patch:kind, or any; the file a path or its ending."""
    entries = []
    for word in _words(text):
        kind, at, place = word.partition("@")
        file, colon, line = place.rpartition(":")
        if not at or not colon or not file or not line.isdigit() or not re.fullmatch(r"[a-z0-9_:-]+", kind):
            raise ShimsConfigError(f"{shown or IGNORE_VAR}={text!r}: {word!r} is not valid; valid: a comma list of "
                                   "kind@file:line, e.g. eval-with-grad@train.py:88 (kind: a finding's kind as the "
                                   "report shows it, or any)")
        entries.append((kind, file, int(line)))
    return tuple(entries)


def int_range(option):
    """(minimum, maximum) of an "int" option; None where open. Counts are never negative unless declared."""
    return getattr(option, "minimum", 0), getattr(option, "maximum", None)


def _parse_option(var, option, text, shown=None):
    where = _where(var, text, shown)
    if option.kind == "choice":
        return _parse_choice(var, text, option.choices, shown=shown)
    if option.kind == "list":
        words = tuple(_words(text))
        bad = [w for w in words if not w.replace(".", "_").isidentifier()]
        if bad:
            raise ShimsConfigError(f"{where}: {bad[0]!r} is not a valid name; valid: a comma list of "
                                   "Python identifiers (dotted module names allowed)")
        return words
    if option.kind == "sites":
        words = tuple(_words(text))
        for word in words:
            module, _, func = word.partition(":")
            if not func or not all(p.isidentifier() for p in module.split(".") + func.split(".")):
                raise ShimsConfigError(f"{where}: {word!r} is not a call site; valid: a comma list of "
                                       "module:function, e.g. mypkg.trainer:build_model")
        return words
    if option.kind == "int":
        low, high = int_range(option)
        valid = (f"a whole number from {low} to {high}" if low is not None and high is not None
                 else f"a whole number >= {low}" if low is not None
                 else f"a whole number <= {high}" if high is not None else "a whole number")
        try:
            value = int(text.strip())
        except ValueError:
            raise ShimsConfigError(f"{where} is not an integer; valid: {valid}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ShimsConfigError(f"{where} is out of range; valid: {valid}")
        return value
    return text


def parse(environ, registry, shown=None):
    """Build a Config from a mapping of environment variables and the tuple of declared patches.

    Raises ShimsConfigError naming the variable, the bad value and the valid choices; where a value came from an
    argument of `shims.enable`, `shown` (variable -> how to name that argument) names the argument instead.
    """
    names = [p.name for p in registry]
    option_vars = {}
    for patch in registry:
        for option in patch.options:
            option_vars[f"SHIMS_{patch.name.upper()}_{option.name}"] = (patch.name, option)

    # a plug-in's options are known once it loads: its SHIMS_<NAME>_* variables are checked then (the receipt says)
    pending = tuple(f"SHIMS_{p.name.upper()}_" for p in registry if getattr(p, "loaded", True) is False)
    for var in environ:
        if var.startswith("SHIMS_") and not var.startswith("SHIMS__") and var not in GLOBAL_VARS \
                and var not in option_vars and not var.startswith(pending):
            known = list(GLOBAL_VARS) + sorted(option_vars)
            what = (f"{shown[var]}: unknown option {var}" if var in (shown or {})
                    else f"unknown variable {var}={environ[var]!r}")
            raise ShimsConfigError(f"{what}{_suggest(var, known)}; valid variables: {', '.join(known)}")

    mode = _parse_choice("SHIMS_MODE", environ.get("SHIMS_MODE", "fix"), MODES, shown=shown)
    selected = _parse_names("SHIMS_PATCHES", environ.get("SHIMS_PATCHES", "all"), names, True, shown)
    disabled = _parse_names("SHIMS_DISABLE", environ.get("SHIMS_DISABLE", ""), names, False, shown)
    strict = _parse_bool("SHIMS_STRICT", environ.get("SHIMS_STRICT", "0"), shown)
    report = environ.get("SHIMS_REPORT", "").strip() or None
    log = environ.get("SHIMS_LOG", "").strip()
    log = _parse_choice("SHIMS_LOG", log, LOG_LEVELS, fold=str.upper, shown=shown) if log else None
    profile = environ.get(PROFILE_VAR, "")
    profile_steps = (parse_profile_steps(profile, (shown or {}).get(PROFILE_VAR)) if profile.strip()
                     else None)  # read by detect mode only
    ignores = parse_ignores(environ.get(IGNORE_VAR, ""), (shown or {}).get(IGNORE_VAR))  # the doctor's report

    why_off = {}
    for name in names:
        if mode == "off":
            why_off[name] = "SHIMS_MODE=off"
        elif name not in selected:
            why_off[name] = f"not in SHIMS_PATCHES={environ.get('SHIMS_PATCHES', 'all')}"
        elif name in disabled:
            why_off[name] = "listed in SHIMS_DISABLE"
    enabled = tuple(n for n in names if n not in why_off)

    options = {patch.name: patch_options(patch, environ, shown) for patch in registry}
    return Config(patches=enabled, why_off=why_off, mode=mode, strict=strict, report=report, log=log,
                  options=options, source=dict((k, v) for k, v in environ.items() if k.startswith("SHIMS_")),
                  profile_steps=profile_steps, ignores=ignores)


def _code(value):
    return f"`{value}`"


def option_values(option):
    """What an option accepts, in words (the tables, `list`, errors)."""
    if option.kind == "choice":
        return ", ".join(_code(c) for c in option.choices)
    if option.kind == "list":
        return "comma list of names"
    if option.kind == "sites":
        return "comma list of `module:function`"
    if option.kind == "int":
        low, high = int_range(option)
        return (f"a whole number from {low} to {high}" if low is not None and high is not None
                else f"a whole number >= {low}" if low is not None else "a whole number")
    return "text"


def option_default(option):
    default = option.default
    if isinstance(default, (list, tuple)):
        return ", ".join(_code(d) for d in default) or "(empty)"
    return "(none)" if default is None else _code(default)


def environment_rows(registry):
    """(variable, values, default, meaning) for every variable shims reads: the global ones, then each patch's
    options. One source for the README table and `python -m shims --help` (markdown: `environment_markdown`)."""
    rows = list(VARIABLES)
    for patch in registry:
        for option in patch.options:
            rows.append((f"SHIMS_{patch.name.upper()}_{option.name}", option_values(option), option_default(option),
                         option.help))
    return rows


def environment_markdown(registry):
    """The README's table of environment variables (tests/core/test_config.py keeps the README equal to it)."""
    lines = ["| variable | values | default | meaning |", "|---|---|---|---|"]
    for name, values, default, meaning in environment_rows(registry):
        lines.append(f"| `{name}` | {values} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def patch_options(patch, environ, shown=None):
    """One patch's option values from SHIMS_<PATCH>_<OPTION> variables (defaults where unset); ShimsConfigError."""
    values = {}
    for option in patch.options:
        var = f"SHIMS_{patch.name.upper()}_{option.name}"
        values[option.name] = _parse_option(var, option, environ[var], shown) if var in environ else option.default
    return values


def from_environment(registry, overrides=None, shown=None):
    """Parse os.environ, with `overrides` (variable -> text) laid over it, as `shims.enable(...)` does; `shown`:
    variable -> the argument it came from, for errors (see `overrides_from_arguments`)."""
    # the user's environment: while shims is enabled, os.environ also holds what it exported for children
    source = _EXPORTED if _EXPORTED is not None else os.environ
    environ = {k: v for k, v in source.items() if k.startswith("SHIMS_")}
    if overrides:
        environ.update(overrides)
    return parse(environ, registry, shown)


def overrides_from_arguments(patches=None, disable=None, mode=None, strict=None, report=None, log=None,
                             options=None):
    """Translate `shims.enable(...)` arguments into the variables they stand for (validated by `parse`).

    Returns (variables, shown): `shown` maps each variable to the argument it came from, as errors name it
    (`shims.enable(patches=['doctr', 'nope'])`)."""
    given = {"patches": patches, "disable": disable, "mode": mode, "strict": strict, "report": report, "log": log}
    out = {}
    if patches is not None:
        out["SHIMS_PATCHES"] = patches if isinstance(patches, str) else ",".join(patches) or "none"
    if disable is not None:
        out["SHIMS_DISABLE"] = disable if isinstance(disable, str) else ",".join(disable)
    if mode is not None:
        out["SHIMS_MODE"] = str(mode)
    if strict is not None:
        out["SHIMS_STRICT"] = "1" if strict is True else "0" if strict is False else str(strict)
    if report is not None:
        out["SHIMS_REPORT"] = os.fspath(report)
    if log is not None:
        out["SHIMS_LOG"] = str(log)
    for key, value in (options or {}).items():
        text = value if isinstance(value, str) else ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        out[key if key.startswith("SHIMS_") else "SHIMS_" + key.upper()] = text
    shown = {}
    for argument, var in (("patches", "SHIMS_PATCHES"), ("disable", "SHIMS_DISABLE"), ("mode", "SHIMS_MODE"),
                          ("strict", "SHIMS_STRICT"), ("report", "SHIMS_REPORT"), ("log", "SHIMS_LOG")):
        if given[argument] is not None:
            shown[var] = f"shims.enable({argument}={given[argument]!r})"
    for key, value in (options or {}).items():
        var = key if key.startswith("SHIMS_") else "SHIMS_" + key.upper()
        shown[var] = f"shims.enable(options={{{key!r}: {value!r}}})"
    return out, shown


def export_for_children(config, bootstrap_dir):
    """Make processes started from here (spawn children, DataLoader workers, torchrun workers) start shims too.

    The child's environment carries the same SHIMS_* variables and a sitecustomize directory on PYTHONPATH.
    """
    global _EXPORTED
    if _EXPORTED is None:  # what the environment held before shims wrote to it, for withdraw_from_children
        _EXPORTED = {k: v for k, v in os.environ.items() if k.startswith("SHIMS_")}
    for key in [k for k in os.environ if k.startswith("SHIMS_") and not k.startswith("SHIMS__")]:
        if key not in config.source:
            del os.environ[key]  # a variable the new configuration overrode away must not reach children
    for key, value in config.source.items():
        os.environ[key] = value
    os.environ[BOOT_VAR] = "1"
    os.environ.setdefault(PARENT_VAR, str(os.getpid()))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if bootstrap_dir not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([bootstrap_dir] + parts)


def withdraw_from_children(bootstrap_dir):
    """Undo `export_for_children` (after shims.disable()): the SHIMS_* variables are as they were before."""
    global _EXPORTED
    os.environ.pop(BOOT_VAR, None)
    if _EXPORTED is not None:
        before, _EXPORTED = _EXPORTED, None
        for key in [k for k in os.environ if k.startswith("SHIMS_") and k != BOOT_VAR]:
            if key not in before:
                del os.environ[key]
        for key, value in before.items():
            if key != BOOT_VAR:
                os.environ[key] = value
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap_dir]
    if parts:
        os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        os.environ.pop("PYTHONPATH", None)


def is_child():
    """True in a process that shims' bootstrap started (a child of a process that ran shims)."""
    return os.environ.get(BOOT_VAR) == "1" and os.environ.get(PARENT_VAR, str(os.getpid())) != str(os.getpid())


def booted_by_parent():
    return os.environ.get(BOOT_VAR) == "1"
