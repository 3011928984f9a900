"""Reach functions defined in the script being run (`Target(MAIN, name)`), before the script first calls them.

A script that starts with `import shims.auto` defines `fit_one_epoch` AFTER shims has run, and `main()` looks it up by
its global name at call time. So shims watches the script's module-level code, line by line, and replaces the function
in the script's globals right after its `def` runs. Only the script's own module frame is traced; the watch stops as
soon as every target the script defines (read from its source) has been handled, so training runs with no tracer.

Two mechanisms:
    compiled   when shims itself runs the file (`python -m shims run script.py`, a spawn child's `__mp_main__`
               through runpy.run_path), `run_path` compiles the script with one call after each target's `def`
               (line numbers unchanged): no tracer at all, the script's imports run at full speed.
    watched    when the script is already running (`import shims.auto` inside it) or the interpreter runs the
               file itself (a torchrun worker): on Python 3.12+, sys.monitoring LINE events of the script's module
               code object only; on 3.9-3.11, a trace of the script's module frame, during which every Python call
               pays for the global trace hook (measured: importing torch and doctr took about 1.2 s longer, once
               per process). Either is removed as soon as the targets are handled. On 3.9-3.11 a first-line
               `import shims.auto` avoids it: shims/startup/takeover.py runs the rest of the script compiled, and the
               watch is only its fallback (docs/startup.md).
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
            if _monitor_frame(self, frame):  # 3.12+: from here on only the script's own code is watched
                sys.settrace(None)
                return None
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
        # once stopped, None: CPython 3.9 stores a returned function back as the frame's f_trace, and a frame with an
        # f_trace reports the line number the tracer saw last (tracebacks and warnings of module code would name it)
        return self._local if self.active else None

    def _check(self):
        if not self.active:
            return
        pending = self.engine.apply_in_namespace(self.frame.f_globals, self.label)
        if not (self.expected & pending):
            self.stop()

    def start_on_frame(self, frame):
        self.frame, self.label = frame, frame.f_globals.get("__name__", "__main__")
        self.active = True
        if _monitor_frame(self, frame):
            return
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
        _unmonitor(self)
        if sys.gettrace() in (self._global, self._global_after_found):
            sys.settrace(None)
        if self.frame is not None and self.frame.f_trace == self._local:
            self.frame.f_trace = None
        self.frame = None


# Python 3.12+: sys.monitoring reports LINE events of one code object only (the script's module code), so the rest
# of the program, its imports included, runs without any per-call hook. One tool id, while a watch is on.
_MONITOR_TOOL_IDS = (4, 3)  # ids free by convention (0 debugger, 1 coverage, 2 profiler, 5 optimizer)
_MONITORED = {}  # tool id -> (ScriptWatch, code)


def _monitor_frame(watch, frame):
    """Watch `frame`'s lines with sys.monitoring (3.12+). False when unavailable (older Python, ids taken)."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:
        return False
    for tool in _MONITOR_TOOL_IDS:
        if monitoring.get_tool(tool) is None:
            break
    else:
        return False
    code = frame.f_code
    events = monitoring.events
    try:
        monitoring.use_tool_id(tool, "shims")

        def on_line(code_seen, line):
            if code_seen is code:
                watch._check()
            return None if watch.active else monitoring.DISABLE

        def on_return(code_seen, offset, value):
            if code_seen is code:
                watch.stop()

        monitoring.register_callback(tool, events.LINE, on_line)
        monitoring.register_callback(tool, events.PY_RETURN, on_return)
        monitoring.set_local_events(tool, code, events.LINE | events.PY_RETURN)
    except Exception:  # noqa: BLE001 - fall back to the tracer
        try:
            monitoring.free_tool_id(tool)
        except Exception:  # noqa: BLE001
            pass
        return False
    _MONITORED[tool] = (watch, code)
    return True


def _unmonitor(watch):
    monitoring = getattr(sys, "monitoring", None)
    for tool, (owner, code) in list(_MONITORED.items()):
        if owner is not watch:
            continue
        del _MONITORED[tool]
        try:
            monitoring.set_local_events(tool, code, 0)
            monitoring.register_callback(tool, monitoring.events.LINE, None)
            monitoring.register_callback(tool, monitoring.events.PY_RETURN, None)
            monitoring.free_tool_id(tool)
        except Exception:  # noqa: BLE001
            pass


_WATCHED = {}  # real path -> ScriptWatch or CompiledWatch


def defined(*names):
    """Called by a compiled script right after each target's `def` (the call `_insert_hooks` adds): hand its globals
    to the watch of that file. Reached through `__import__`, so the script's globals gain no name of shims."""
    frame = sys._getframe(1)
    watch = _WATCHED.get(os.path.realpath(frame.f_code.co_filename))
    if isinstance(watch, CompiledWatch):
        watch.defined(frame.f_globals, names)


class CompiledWatch:
    """A script that shims compiles itself: the call after each target's `def` hands the script's globals over."""

    def __init__(self, engine, path):
        self.engine, self.path = engine, path
        self.active = True
        self.frame = None

    def defined(self, namespace, names):
        if not self.active:
            return
        try:
            self.engine.apply_in_namespace(namespace, namespace.get("__name__", "__main__"))
        except Exception as exc:  # noqa: BLE001 - never crash the user's script
            from shims._log import logger
            logger().warning("shims could not reach %s in %s: %s", ", ".join(names), self.path, exc)

    def stop(self):
        self.active = False


def _top_level_blocks():
    import ast
    return tuple(getattr(ast, name) for name in ("If", "Try", "TryStar", "With", "AsyncWith") if hasattr(ast, name))


def _insert_hooks(body, expected, inserted):
    """After each `def NAME` (NAME expected) in a top-level statement list, and in the bodies of top-level compound
    statements (`if`, `try`, `with`), add on the def's own line
        __import__("shims.startup.mainwatch").startup.mainwatch.defined("NAME")
    (`__import__` of a loaded module only looks it up in sys.modules; the script's globals gain no name)."""
    import ast
    out = []
    for stmt in body:
        out.append(stmt)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if stmt.name in expected:
                hook = ast.Call(func=ast.Name(id="__import__", ctx=ast.Load()),
                                args=[ast.Constant(__name__)], keywords=[])  # the package `shims`
                for attr in __name__.split(".")[1:] + ["defined"]:
                    hook = ast.Attribute(value=hook, attr=attr, ctx=ast.Load())
                call = ast.Call(func=hook, args=[ast.Constant(stmt.name)], keywords=[])
                out.append(ast.fix_missing_locations(ast.copy_location(ast.Expr(value=call), stmt)))
                inserted.add(stmt.name)
            continue
        if not isinstance(stmt, _top_level_blocks()):
            continue  # not inside classes, functions or loops: those defs are not the script's globals
        for field in ("body", "orelse", "finalbody"):
            block = getattr(stmt, field, None)
            if block:
                setattr(stmt, field, _insert_hooks(block, expected, inserted))
        for handler in getattr(stmt, "handlers", ()):
            handler.body = _insert_hooks(handler.body, expected, inserted)
    return out


def compile_watched(path, expected):
    """The script's code with the hook calls inserted, and the names they cover; (None, reason) when it cannot."""
    import ast
    try:
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
        inserted = set()
        tree.body = _insert_hooks(tree.body, expected, inserted)
        if not inserted:
            return None, "no top-level def of the targets"
        return compile(tree, path, "exec", dont_inherit=True), inserted
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def run_path(engine, path_name, init_globals=None, run_name=None, fallback=None):
    """`runpy.run_path(path_name, init_globals, run_name)` for a script shims runs itself, compiled with the hooks
    (no tracer). Scripts it cannot compile that way (a directory, a zip, a .pyc, a shape it does not know) run
    through `fallback` (the original runpy.run_path) with the traced watch."""
    import runpy
    fallback = fallback or runpy.run_path
    run_code = getattr(runpy, "_run_module_code", None)  # private, same signature in CPython 3.9-3.13
    key = os.path.realpath(path_name)
    if engine.active and run_code is not None and os.path.isfile(path_name) and str(path_name).endswith(".py") \
            and not isinstance(_WATCHED.get(key), ScriptWatch):
        code, _ = compile_watched(path_name, engine.main_names())
        if code is not None:
            watch = CompiledWatch(engine, path_name)
            _WATCHED[key] = watch
            engine._watches.append(watch)
            run_globals = dict(init_globals or {})
            name = "<run_path>" if run_name is None else run_name
            try:
                return run_code(code, run_globals, name, pkg_name=name.rpartition(".")[0], script_name=path_name)
            finally:
                watch.stop()
    if engine.active:
        engine.watch_script(path=path_name)
    return fallback(path_name, init_globals, run_name)


def start(engine, path=None, frame=None):
    """Watch a script given by its path or by its running module frame. Returns the watch, or None."""
    if frame is not None:
        path = frame.f_code.co_filename
    if not path:
        return None
    key = os.path.realpath(path)
    existing = _WATCHED.get(key)
    if existing is not None and (existing.active or existing.engine is engine and existing.frame is None):
        return None  # already watched (a compiled run, or `import shims.auto` inside a script shims runs)
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
