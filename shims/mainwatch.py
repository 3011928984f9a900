"""Reach functions defined in the script being run (`Target(MAIN, name)`), before the script first calls them.

A script that starts with `import shims.auto` defines `fit_one_epoch` AFTER shims has run, and `main()` looks it up by
its global name at call time. So shims watches the script's module-level code, line by line, and replaces the function
in the script's globals right after its `def` runs. Only the script's own module frame is traced; the watch stops as
soon as every target the script defines (read from its source) has been handled, so training runs with no tracer.

Three ways in, one mechanism:
    frame=...  `import shims.auto` inside the script: trace that (already running) frame.
    path=...   `python -m shims run script.py`, a spawn child's `__mp_main__`, a torchrun worker: wait for the
               module code of that file to start, then trace it.
If a trace function is already set (a debugger, coverage), shims does not replace it: the receipt says so.
"""

from __future__ import annotations

import os
import sys


def _defined_names(path):
    """Names of functions defined at the top level of the script (None when its source cannot be read)."""
    import ast
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.If):  # functions defined under `if` at top level (e.g. version switches)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(sub.name)
    return names


def _same_file(a, b):
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class ScriptWatch:
    def __init__(self, engine, path, expected):
        self.engine, self.path, self.expected = engine, path, set(expected)
        self.frame = None
        self.active = False
        self.label = None

    # the tracer: `_global` sees new frames until the script's module frame starts; `_local` sees its lines
    def _global(self, frame, event, arg):
        if self.frame is None and event == "call" and frame.f_code.co_name == "<module>" \
                and _same_file(frame.f_code.co_filename, self.path):
            self.frame = frame
            self.label = frame.f_globals.get("__name__", "__main__")
            return self._local
        return None

    def _local(self, frame, event, arg):
        if frame is not self.frame:
            return None
        if event == "line":
            self._check()
        elif event == "return":
            self._check()
            self.stop()
            return None
        return self._local

    def _check(self):
        if not self.active:
            return
        pending = self.engine.apply_in_namespace(self.frame.f_globals, self.label)
        if not (self.expected & pending):
            self.stop()

    def start_on_frame(self, frame):
        self.frame, self.label = frame, frame.f_globals.get("__name__", "__main__")
        self.active = True
        frame.f_trace = self._local
        frame.f_trace_lines = True
        sys.settrace(self._global_after_found)

    def _global_after_found(self, frame, event, arg):
        return None  # trace nothing else: only the script frame (whose f_trace is set) reports lines

    def start_on_path(self):
        self.active = True
        sys.settrace(self._global)

    def stop(self):
        if not self.active:
            return
        self.active = False
        if sys.gettrace() in (self._global, self._global_after_found):
            sys.settrace(None)
        if self.frame is not None and self.frame.f_trace == self._local:
            self.frame.f_trace = None
        self.frame = None


_WATCHED = {}  # real path -> ScriptWatch


def start(engine, path=None, frame=None):
    """Watch a script given by its path or by its running module frame. Returns the watch, or None."""
    if frame is not None:
        path = frame.f_code.co_filename
    if not path:
        return None
    key = os.path.realpath(path)
    existing = _WATCHED.get(key)
    if existing is not None and (existing.active or existing.engine is engine and existing.frame is None):
        return None
    targets = engine.main_names()
    defined = _defined_names(path)
    expected = targets & defined if defined is not None else set()
    if not expected:
        return None  # the script defines none of the target functions: nothing to watch, no tracer
    if sys.gettrace() is not None:
        for patch, target in engine._main_targets:
            if target.qualname in expected:
                engine.receipt.record(patch.name).target(
                    target, "skipped", "a trace function (debugger or coverage) is active; shims does not replace "
                    "it. Run without it, or import the function from a module (SHIMS_<PATCH>_MODULES)")
        return None
    watch = ScriptWatch(engine, path, expected)
    _WATCHED[key] = watch
    if frame is not None:
        # the functions defined before `import shims.auto` (unusual) are handled now
        watch.start_on_frame(frame)
        watch._check()
    else:
        watch.start_on_path()
    return watch
