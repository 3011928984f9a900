"""Environment -> a frozen, validated configuration. The one module that reads (and, for children, writes) os.environ.

Variables (README has the table):
    SHIMS_PATCHES   all (default) | none | comma list of patch names
    SHIMS_DISABLE   comma list of patch names to leave out (applied after SHIMS_PATCHES)
    SHIMS_MODE      fix (default) | detect (observe and report, change nothing) | off
    SHIMS_STRICT    0 (default) | 1: a patch that cannot apply raises instead of being skipped
    SHIMS_REPORT    path of a JSON receipt written at exit ("{pid}" is replaced by the process id)
    SHIMS_LOG       level of the `shims` logger: DEBUG, INFO, WARNING, ERROR, CRITICAL
    SHIMS_PROFILE_STEPS   detect mode: torch.profiler over this many optimizer steps (doctor's --profile N)
    SHIMS_IGNORE    detect mode: findings to suppress, comma list of kind@file:line (counted in the report)
    SHIMS_<PATCH>_<OPTION>   per-patch options, declared by each patch (`python -m shims list` shows them)
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
GLOBAL_VARS = ("SHIMS_PATCHES", "SHIMS_DISABLE", "SHIMS_MODE", "SHIMS_STRICT", "SHIMS_REPORT", "SHIMS_LOG",
               PROFILE_VAR, IGNORE_VAR)
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


def _parse_names(var, text, names, allow_all):
    words = _words(text.lower())
    if allow_all and words in (["all"], ["none"]):
        return list(names) if words == ["all"] else []
    valid = ("all, none, or " if allow_all else "") + "a comma list of: " + ", ".join(names)
    if not words and allow_all:
        raise ShimsConfigError(f"{var}={text!r} is empty; valid: {valid}")
    for word in words:
        if word not in names:
            if not names:  # every patch module failed to import (shims.patches missing: not installed?)
                from shims import registry
                problems = "; ".join(f"{n}: {p}" for n, p in registry.broken().items()) or "none registered"
                raise ShimsConfigError(f"{var}={text!r}: no patch could be loaded ({problems}); install shims with "
                                       "pip (patches/ becomes shims.patches) or run from an installed environment")
            raise ShimsConfigError(f"{var}={text!r}: unknown patch {word!r}{_suggest(word, names)}; valid: {valid}")
    return words


def _parse_choice(var, text, choices, fold=str.lower):
    value = fold(text.strip())
    if value not in choices:
        raise ShimsConfigError(f"{var}={text!r} is not valid{_suggest(value, choices)}; valid: {', '.join(choices)}")
    return value


def _parse_bool(var, text):
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ShimsConfigError(f"{var}={text!r} is not valid; valid: 1, 0, true, false, yes, no, on, off")


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


def _parse_option(var, option, text):
    if option.kind == "choice":
        return _parse_choice(var, text, option.choices)
    if option.kind == "list":
        words = tuple(_words(text))
        bad = [w for w in words if not w.replace(".", "_").isidentifier()]
        if bad:
            raise ShimsConfigError(f"{var}={text!r}: {bad[0]!r} is not a valid name; valid: a comma list of "
                                   "Python identifiers (dotted module names allowed)")
        return words
    if option.kind == "sites":
        words = tuple(_words(text))
        for word in words:
            module, _, func = word.partition(":")
            if not func or not all(p.isidentifier() for p in module.split(".") + func.split(".")):
                raise ShimsConfigError(f"{var}={text!r}: {word!r} is not a call site; valid: a comma list of "
                                       "module:function, e.g. mypkg.trainer:build_model")
        return words
    if option.kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise ShimsConfigError(f"{var}={text!r} is not an integer") from None
    return text


def parse(environ, registry):
    """Build a Config from a mapping of environment variables and the tuple of declared patches.

    Raises ShimsConfigError naming the variable, the bad value and the valid choices.
    """
    names = [p.name for p in registry]
    option_vars = {}
    for patch in registry:
        for option in patch.options:
            option_vars[f"SHIMS_{patch.name.upper()}_{option.name}"] = (patch.name, option)

    for var in environ:
        if var.startswith("SHIMS_") and not var.startswith("SHIMS__") and var not in GLOBAL_VARS \
                and var not in option_vars:
            known = list(GLOBAL_VARS) + sorted(option_vars)
            raise ShimsConfigError(f"unknown variable {var}={environ[var]!r}{_suggest(var, known)}; "
                                   f"valid variables: {', '.join(known)}")

    mode = _parse_choice("SHIMS_MODE", environ.get("SHIMS_MODE", "fix"), MODES)
    selected = _parse_names("SHIMS_PATCHES", environ.get("SHIMS_PATCHES", "all"), names, allow_all=True)
    disabled = _parse_names("SHIMS_DISABLE", environ.get("SHIMS_DISABLE", ""), names, allow_all=False)
    strict = _parse_bool("SHIMS_STRICT", environ.get("SHIMS_STRICT", "0"))
    report = environ.get("SHIMS_REPORT", "").strip() or None
    log = environ.get("SHIMS_LOG", "").strip()
    log = _parse_choice("SHIMS_LOG", log, LOG_LEVELS, fold=str.upper) if log else None
    profile = environ.get(PROFILE_VAR, "")
    profile_steps = parse_profile_steps(profile) if profile.strip() else None  # read by detect mode only
    ignores = parse_ignores(environ.get(IGNORE_VAR, ""))  # read by the doctor's report

    why_off = {}
    for name in names:
        if mode == "off":
            why_off[name] = "SHIMS_MODE=off"
        elif name not in selected:
            why_off[name] = f"not in SHIMS_PATCHES={environ.get('SHIMS_PATCHES', 'all')}"
        elif name in disabled:
            why_off[name] = "listed in SHIMS_DISABLE"
    enabled = tuple(n for n in names if n not in why_off)

    options = {}
    for patch in registry:
        values = {}
        for option in patch.options:
            var = f"SHIMS_{patch.name.upper()}_{option.name}"
            values[option.name] = _parse_option(var, option, environ[var]) if var in environ else option.default
        options[patch.name] = values
    return Config(patches=enabled, why_off=why_off, mode=mode, strict=strict, report=report, log=log,
                  options=options, source=dict((k, v) for k, v in environ.items() if k.startswith("SHIMS_")),
                  profile_steps=profile_steps, ignores=ignores)


def from_environment(registry, overrides=None):
    """Parse os.environ, with `overrides` (variable -> text) laid over it, as `shims.enable(...)` does."""
    # the user's environment: while shims is enabled, os.environ also holds what it exported for children
    source = _EXPORTED if _EXPORTED is not None else os.environ
    environ = {k: v for k, v in source.items() if k.startswith("SHIMS_")}
    if overrides:
        environ.update(overrides)
    return parse(environ, registry)


def overrides_from_arguments(patches=None, disable=None, mode=None, strict=None, report=None, log=None,
                             options=None):
    """Translate `shims.enable(...)` arguments into the variables they stand for (validated by `parse`)."""
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
    return out


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
