"""`import shims.auto` on Python 3.9-3.11 without a tracer: run the rest of the script compiled (docs/startup.md).

When the import is a top-level statement of the script that the interpreter itself runs (`python train.py`,
`python -m pkg.train`, `coverage run train.py`), the statements from that import on are compiled with one call after
each target's `def` (mainwatch's hooks: same file name, same line numbers) and run here, in the script's own globals.
The script's original execution then ends the way its own end would:
    normal end     where the interpreter runs the file: stdout/stderr flushed and `__file__` dropped as it does;
                   then a clean SystemExit: status 0, non-daemon threads joined and atexit handlers run by the
                   same interpreter shutdown
    sys.exit(n)    the SystemExit propagates unchanged (status, message)
    an exception   it propagates unchanged (status 1; KeyboardInterrupt still ends the process by SIGINT), and the
                   traceback sys.excepthook prints is the script's own: the `import shims.auto` line and shims'
                   frames are cut out of it (a missing or failing hook: the interpreter's own words)
Meanwhile other threads may import shims.auto (its module lock is released), and a debugger or profiler the script
starts is handed on past the script's end without seeing shims' frames. The statements before the import have run
once and are not run again. Everything else (a debugger owning the trace function, `python -i`, a PYTHONSTARTUP
file, -c or stdin, an import inside `if`/`try`/a function/another module, a launcher that runs the script through
runpy and goes on afterwards, a file changed since Python read it) falls back to mainwatch's watch.
On 3.12+ mainwatch's sys.monitoring watch is already free, and this module is not used.
"""

from __future__ import annotations

import os
import sys

AUTO = "shims.auto"


def _future_flags():
    import __future__
    flags = 0
    for name in __future__.all_feature_names:
        flags |= getattr(__future__, name).compiler_flag
    return flags


def _importer(auto_frame):
    """The frame whose code executed `import shims.auto` (the first frame above importlib's own)."""
    frame = auto_frame.f_back if auto_frame is not None else None
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame


def _runner(frame):
    """Who runs the script's module code, when nothing but the interpreter's exit follows it; else None."""
    back = frame.f_back
    if back is None:
        return "interpreter"
    code = back.f_code
    if code.co_filename in ("<frozen runpy>", os.path.join(os.path.dirname(os.__file__), "runpy.py")) \
            and code.co_name == "_run_code":  # runpy is frozen from 3.11
        outer = back.f_back
        if outer is not None and outer.f_code.co_name == "_run_module_as_main" and outer.f_back is None:
            return "python -m"
    if code.co_filename.replace(os.sep, "/").endswith("coverage/execfile.py") and code.co_name == "run":
        return "coverage"  # coverage's runner passes SystemExit on and prints exceptions with sys.excepthook
    return None


def _is_the_script(path):
    """Whether `path` is the script named by sys.argv[0] (`python train.py`, `-m`, coverage), not a file that runs
    in __main__ on the way to a prompt (PYTHONSTARTUP: argv[0] is '' there, and the prompt must follow)."""
    script = sys.argv[0] if sys.argv else ""
    return bool(script) and _same_file(script, path)


def _same_file(a, b):
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _is_coverage(tracer):
    owner = getattr(tracer, "__self__", tracer)  # PyTracer's bound method, or the CTracer object itself
    return type(owner).__module__.split(".")[0] == "coverage"


def _imports_auto(stmt):
    """For `import ..., shims.auto, ...` the position of shims.auto among the names; 0 for `from shims import
    auto`; None when the statement does not import shims.auto."""
    import ast
    if isinstance(stmt, ast.Import):
        for i, alias in enumerate(stmt.names):
            if alias.name == AUTO:
                return i
    elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module == "shims" and \
            any(alias.name == "auto" for alias in stmt.names):
        return 0
    return None


class Takeover:
    def __init__(self, engine, frame, path, code, runner):
        self.engine, self.frame, self.path, self.code, self.runner = engine, frame, path, code, runner

    def run(self):
        """Run the rest of the script, then end its original execution as its own end would. Never returns."""
        from shims.startup import mainwatch
        namespace = self.frame.f_globals
        watch = mainwatch.CompiledWatch(self.engine, self.path)
        mainwatch._WATCHED[os.path.realpath(self.path)] = watch
        self.engine._watches.append(watch)
        self.engine.apply_in_namespace(namespace, "__main__")  # targets defined before the import (unusual)
        _finish_import_of_auto()
        held = _release_import_lock()
        _no_line_events_below(self.frame)
        try:
            exec(self.code, namespace)  # noqa: S102 - the user's own script, the rest of it
        except SystemExit:
            hooks = sys.gettrace(), sys.getprofile(), sys.settrace(None), sys.setprofile(None)  # C calls only
            raise
        except BaseException as exc:
            hooks = sys.gettrace(), sys.getprofile(), sys.settrace(None), sys.setprofile(None)
            _print_without_shims_frames(exc, self.frame, self.code)
            raise
        else:
            hooks = sys.gettrace(), sys.getprofile(), sys.settrace(None), sys.setprofile(None)
        finally:
            given_back = _Tracer(hooks[0], hooks[1], self.frame)  # noqa: F841 - set again as the frames go
            watch.stop()
            _take_back_import_lock(held)
        _end_like_the_script(namespace, self.runner)


def _finish_import_of_auto():
    """shims.auto's own work is done: other threads importing it must not wait for the script's end."""
    module = sys.modules.get(AUTO)
    spec = getattr(module, "__spec__", None)
    if spec is not None:
        spec._initializing = False  # what importlib's module lock waits on (CPython 3.9-3.11)
    package = sys.modules.get("shims")
    if module is not None and package is not None:
        setattr(package, "auto", module)


def _no_line_events_below(script_frame):
    """No line events in the frames between the script's original frame and the rest of the script (importlib's,
    shims'), should a debugger started in the script (breakpoint()) trace them: they are not the script's."""
    frame = sys._getframe(1)
    while frame is not None:
        frame.f_trace_lines = False
        if frame is script_frame:
            break
        frame = frame.f_back


class _Tracer:
    """A trace or profile function the script set (a debugger started by breakpoint(), a profiler) that the script's
    end hands on, as without shims, to what runs after it (threading's shutdown, atexit), but not to the frames of
    shims and importlib that the end passes through: set again when this object is freed, which happens as the
    interpreter clears the final SystemExit, before its shutdown runs any Python code."""

    def __init__(self, tracer, profiler, script_frame):
        self.tracer = tracer if tracer is not None and not _is_coverage(tracer) else None
        self.profiler = profiler
        if tracer is not None and self.tracer is None:
            sys.settrace(tracer)  # coverage measures on, as it does after any script's end
        if self.tracer is None:
            return
        frame = sys._getframe(1)
        while frame is not None:
            frame.f_trace = None
            if frame is script_frame:
                break
            frame = frame.f_back

    def __del__(self):
        if self.tracer is not None and sys.gettrace() is None:
            sys.settrace(self.tracer)
        if self.profiler is not None and sys.getprofile() is None:
            sys.setprofile(self.profiler)


def _release_import_lock():
    """Release importlib's per-module lock on shims.auto, which this thread holds while the import runs (the rest of
    the script). Python 3.9/3.10's importlib.import_module takes that lock even for a module in sys.modules, so a
    thread calling it would wait for the script's end. Returns (lock, count) to take back, or None."""
    import _thread
    locks = getattr(sys.modules.get("_frozen_importlib"), "_module_locks", None)
    ref = locks.get(AUTO) if isinstance(locks, dict) else None
    lock = ref() if ref is not None else None
    if lock is None or getattr(lock, "owner", None) != _thread.get_ident() or not getattr(lock, "count", 0):
        return None
    count = lock.count
    for _ in range(count):
        lock.release()
    return lock, count


def _take_back_import_lock(held):
    """Hold the lock again before the import's end: importlib releases it when the exception leaves the import."""
    if held is not None:
        lock, count = held
        for _ in range(count):
            lock.acquire()


def _end_like_the_script(namespace, runner):
    if runner != "interpreter":
        raise SystemExit  # runpy (-m, a directory) and coverage neither flush nor remove anything at the end
    # the interpreter flushes both streams when a script file's code returns, before threads are joined
    for name in ("stderr", "stdout"):
        try:
            getattr(sys, name).flush()
        except Exception:  # noqa: BLE001 - a closed stream is the script's business, as without shims
            pass
    # and removes the `__file__` and `__cached__` it set
    namespace.pop("__file__", None)
    namespace.pop("__cached__", None)
    raise SystemExit  # status 0; interpreter shutdown (threads, atexit) as after the script's last line


def _cut(tb, script_frame, rest_code):
    """`tb` with the entries from the script's `import shims.auto` line down to the rest of the script removed."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    start = next((i for i, entry in enumerate(entries) if entry.tb_frame is script_frame), None)
    end = None if start is None else next(
        (i for i in range(start + 1, len(entries)) if entries[i].tb_frame.f_code is rest_code), None)
    if end is None:
        return entries[0] if entries else None
    if start == 0:
        return entries[end]
    entries[start - 1].tb_next = entries[end]
    return entries[0]


def _print_without_shims_frames(exc, script_frame, rest_code):
    """When `exc` reaches sys.excepthook (uncaught), hand it the traceback the script would have without shims."""
    previous = getattr(sys, "excepthook", _MISSING)  # the script may have deleted it or set it to anything

    def excepthook(exc_type, value, tb):
        if sys.excepthook is excepthook:
            if previous is _MISSING:
                del sys.excepthook
            else:
                sys.excepthook = previous
        if value is exc:
            try:
                tb = _cut(tb, script_frame, rest_code)
                value.__traceback__ = tb
                if getattr(sys, "last_value", None) is value:
                    sys.last_traceback = tb
            except Exception:  # noqa: BLE001 - print the uncut traceback rather than lose the user's error
                pass
        # what the interpreter prints for a missing or failing hook, without this function's frame
        if previous is _MISSING:
            sys.stderr.write("sys.excepthook is missing\n")
            return _display(exc_type, value, tb)
        try:
            return previous(exc_type, value, tb)
        except SystemExit:
            raise  # the interpreter exits with it, as it does when the hook itself raises SystemExit
        except BaseException as error:  # noqa: BLE001
            sys.stderr.write("Error in sys.excepthook:\n")
            error.__traceback__ = error.__traceback__.tb_next  # the display prints the exception's own
            _display(type(error), error, error.__traceback__)
            sys.stderr.write("\nOriginal exception was:\n")
            _display(exc_type, value, tb)
        return None

    sys.excepthook = excepthook


_MISSING = object()


def _display(exc_type, value, tb):
    """The interpreter's own display of an exception (PyErr_Display), as used when sys.excepthook fails."""
    display = getattr(sys, "__excepthook__", None)
    if callable(display):
        return display(exc_type, value, tb)
    import traceback
    traceback.print_exception(exc_type, value, tb)
    return None


def _why_not(engine, frame, importer):
    """None when the takeover may run, else why not (a sentence), or "" when there is nothing to say."""
    from shims.startup import mainwatch
    if frame is None or importer is not frame:
        return "shims.auto is not imported by the script's module code itself (another module or a function)"
    if frame.f_globals.get("__name__") != "__main__":
        return ""  # __mp_main__: a spawn child's module code must return to multiprocessing
    existing = mainwatch._WATCHED.get(os.path.realpath(frame.f_code.co_filename))
    if existing is not None and existing.active:
        return ""  # shims runs this script already (compiled by `python -m shims run`, a booted child)
    if sys.flags.inspect or (os.environ.get("PYTHONINSPECT") and not sys.flags.ignore_environment):
        return "interactive session after the script (python -i)"
    tracer = sys.gettrace()
    if tracer is not None and not _is_coverage(tracer):
        return "a trace function (a debugger) is active"
    if not _is_the_script(frame.f_code.co_filename):
        return "%s is not the script the interpreter runs (a PYTHONSTARTUP file?)" % frame.f_code.co_filename
    if _runner(frame) is None:
        return "the script is run by %s, which may go on after it" % frame.f_back.f_code.co_filename
    if not os.path.isfile(frame.f_code.co_filename):
        return "no source file (the script comes from -c, stdin or a zip)"
    return None


def plan(engine, auto_frame, frame):
    """A Takeover for the script whose module frame is `frame`, or None (mainwatch's watch then reaches it)."""
    if sys.version_info >= (3, 12) or not engine.active or not engine._main_targets:
        return None
    reason = _why_not(engine, frame, _importer(auto_frame))
    if reason is None:
        reason = _compile_rest(engine, frame)
        if not isinstance(reason, str):
            _debug("import shims.auto: the rest of %s runs compiled, with no tracer", reason.path)
            return reason
    if reason:
        _debug("import shims.auto: the rest of the script is not run compiled: %s", reason)
    return None


def _compile_rest(engine, frame):
    """A Takeover, or why not (a sentence; "" when the rest defines no target, so no watch is needed either)."""
    import warnings
    with warnings.catch_warnings():  # the interpreter showed the script's compile-time warnings once already
        warnings.simplefilter("ignore")
        return _compile_rest_quietly(engine, frame)


def _compile_rest_quietly(engine, frame):
    import ast
    from shims.startup import mainwatch
    path = frame.f_code.co_filename
    try:
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
        targets = engine.main_names()
        if not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in targets
                   for node in ast.walk(tree)):
            return ""  # no target here: nothing to reach, no watch either
        # the file must be the code that is running (not edited since the interpreter read it)
        if compile(tree, path, "exec", dont_inherit=True) != frame.f_code:
            return "the file differs from the code the interpreter is running (changed since it started)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read the script again ({type(exc).__name__}: {exc})"
    line = frame.f_lineno
    found = [(i, stmt, at) for i, stmt in enumerate(tree.body) if stmt.lineno <= line <= stmt.end_lineno
             for at in [_imports_auto(stmt)] if at is not None]
    if len(found) != 1:
        return "`import shims.auto` is not a top-level statement of the script (inside if, try, with, def...)"
    index, stmt, at = found[0]
    if at > 0:  # `import a, shims.auto, b`: `a` is imported and bound already
        stmt = ast.copy_location(ast.Import(names=stmt.names[at:]), stmt)
    # the rest starts with the import statement itself: executed again it only binds its names (shims.auto is in
    # sys.modules), as the original statement would have after the import returned
    rest = [stmt] + tree.body[index + 1:]
    inserted = set()
    rest = mainwatch._insert_hooks(rest, targets, inserted)
    if not inserted:
        return ""
    module = ast.fix_missing_locations(ast.Module(body=rest, type_ignores=[]))
    try:
        code = compile(module, path, "exec", flags=frame.f_code.co_flags & _future_flags(), dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return f"the rest of the script does not compile alone ({type(exc).__name__}: {exc})"
    return Takeover(engine, frame, path, code, _runner(frame))


def _debug(message, *args):
    from shims import _log
    if _log._LEVEL == "DEBUG":  # importing logging costs more than the rest of `import shims.auto`
        _log.logger().debug(message, *args)
