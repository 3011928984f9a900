"""Names of code being run, the same on every Python shims supports.

`code.co_qualname` ("BaseTrainer._setup_train") exists from Python 3.11; on 3.9 and 3.10 a frame only knows its plain
function name. `qualname(frame)` finds the function object that owns the frame's code (a method of the class of its
first argument, a function or a class attribute of its module, else any live function with that code) and takes
its `__qualname__`, so call sites written as `module:Class.method` match on every Python.
"""

from __future__ import annotations


def _owner_qualname(namespace_owner, code):
    attr = namespace_owner.__dict__.get(code.co_name) if hasattr(namespace_owner, "__dict__") else None
    func = getattr(attr, "__func__", attr)  # staticmethod / classmethod
    for _ in range(4):  # decorators that keep __wrapped__ (functools.wraps, wrapt)
        if getattr(func, "__code__", None) is code:
            return func.__qualname__
        func = getattr(func, "__wrapped__", None)
        if func is None:
            break
    return None


def qualname(frame):
    """The qualified name of the function running in `frame` ("Class.method", "function"), else its plain name."""
    code = frame.f_code
    found = getattr(code, "co_qualname", None)
    if found:
        return found
    if code.co_argcount and code.co_varnames:
        first = frame.f_locals.get(code.co_varnames[0])
        if first is not None:
            for klass in (first.__mro__ if isinstance(first, type) else type(first).__mro__):
                found = _owner_qualname(klass, code)
                if found:
                    return found
    value = frame.f_globals.get(code.co_name)
    if getattr(value, "__code__", None) is code:
        return value.__qualname__
    for value in list(frame.f_globals.values()):  # a staticmethod of a module-level class
        if isinstance(value, type):
            found = _owner_qualname(value, code)
            if found:
                return found
    # a nested function (`outer.<locals>.inner`): the function object that owns this code, found through the
    # garbage collector (a scan of live objects: fine for a call site read once, e.g. per DDP construction)
    import gc
    import types
    for owner in gc.get_referrers(code):
        if isinstance(owner, types.FunctionType) and owner.__code__ is code:
            return owner.__qualname__
    return code.co_name
