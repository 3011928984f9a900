"""Rewrite a function's code from its source: parse, transform, compile with the original file and line numbers.

The new function shares the original's globals, defaults, keyword defaults, annotations, name and docstring, so it
behaves as the original would with the change, and tracebacks still point at the user's file and lines.
The original stays reachable as `__wrapped__`.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

from shims.patch import Skip


def function_ast(func):
    """(FunctionDef node with the file's line numbers, source file) for a plain Python function. Raises Skip."""
    if not isinstance(func, types.FunctionType):
        raise Skip(f"{func!r} is not a plain Python function (decorated or wrapped?)")
    code = func.__code__
    if code.co_freevars:
        raise Skip(f"{func.__qualname__} is a closure (free variables {code.co_freevars}); only module-level "
                   "functions are rewritten")
    try:
        lines, first = inspect.getsourcelines(func)
    except (OSError, TypeError) as exc:
        raise Skip(f"source of {func.__qualname__} is not available: {exc}") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != func.__name__:
        raise Skip(f"source of {func.__qualname__} does not start with its def (decorated?)")
    if node.decorator_list:
        raise Skip(f"{func.__qualname__} is decorated; the decorated object is not the function we read")
    ast.increment_lineno(tree, first - 1)
    return node, code.co_filename


def compile_function(original, node, filename, closure_values=None):
    """Build a function from a transformed FunctionDef `node`, bound like `original`.

    closure_values: {name: value} made visible to the new body as read-only closure variables (e.g. a counter the
    rewritten code calls). Defaults and annotations are copied from the original, never re-evaluated.
    """
    closure_values = dict(closure_values or {})
    node = _strip_evaluated_parts(node)
    factory = ast.FunctionDef(
        name="__shims_factory__",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=n) for n in closure_values], vararg=None,
                           kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=[node, ast.Return(value=ast.Name(id=node.name, ctx=ast.Load()))],
        decorator_list=[], returns=None, type_comment=None)
    if hasattr(ast.FunctionDef, "type_params") or "type_params" in ast.FunctionDef._fields:
        factory.type_params = []
    ast.copy_location(factory, node)
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec", dont_inherit=True)
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    make = types.FunctionType(factory_code, original.__globals__, "__shims_factory__")
    new = make(*closure_values.values())
    new.__defaults__ = original.__defaults__
    new.__kwdefaults__ = original.__kwdefaults__
    new.__annotations__ = dict(getattr(original, "__annotations__", {}))
    new.__qualname__ = original.__qualname__
    new.__module__ = original.__module__
    new.__doc__ = original.__doc__
    new.__dict__.update(original.__dict__)
    new.__wrapped__ = original
    return new


def _strip_evaluated_parts(node):
    """Defaults and annotations are evaluated when a def runs: replace them by None so that building the new function
    evaluates nothing of the user's (the real values are copied from the original afterwards)."""
    node = ast.fix_missing_locations(node)
    a = node.args
    a.defaults = [ast.copy_location(ast.Constant(value=None), d) for d in a.defaults]
    a.kw_defaults = [None if d is None else ast.copy_location(ast.Constant(value=None), d) for d in a.kw_defaults]
    for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]:
        arg.annotation = None
    node.returns = None
    return node
