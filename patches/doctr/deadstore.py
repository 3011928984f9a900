"""Find dead stores of a forward call: `x = model(...)[...]` whose value no path ever reads.

The rule, deliberately narrow (a function that does not match exactly is left alone, with the reason):
  1. The statement is `NAME = CALL` where CALL is a call of one of the function's parameters (the model), whose
     arguments are plain names or constants; the call may be followed by constant subscripts or attribute reads
     (`model(images, targets)["loss"]`). Nothing else in the statement can have an effect.
  2. On every path after the statement, NAME is assigned again before anything reads it. Paths are followed through
     `if`/`else` and `with` blocks; any other compound statement that mentions NAME, and any `break`/`continue`
     before the reassignment, count as a read (we do not guess).
  3. NAME is an ordinary local: not global/nonlocal, not captured by an inner function, and the function calls none
     of locals(), vars(), eval(), exec(); the statement is not inside try (a handler could see the value).
The forward call itself has effects (RNG draws, BatchNorm statistics, hooks): removing them is the point, and the
upstream fix (doctr PR #1862) removed exactly them.
"""

from __future__ import annotations

import ast

DYNAMIC = {"locals", "vars", "eval", "exec", "globals"}


class DeadForward:
    """One removable statement: where it is and why it is dead."""

    __slots__ = ("node", "name", "callee", "lineno", "killed_at")

    def __init__(self, node, name, callee, killed_at):
        self.node, self.name, self.callee, self.lineno, self.killed_at = node, name, callee, node.lineno, killed_at

    def __repr__(self):
        return f"<DeadForward line {self.lineno}: {self.name} = {self.callee}(...)>"


def _mentions(node, name):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == name:
            return True
        if isinstance(sub, (ast.Global, ast.Nonlocal)) and name in sub.names:
            return True
    return False


def _reads(node, name):
    """Does this (simple) statement or expression read `name`? Stores don't count; deletes do."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == name and not isinstance(sub.ctx, ast.Store):
            return True
    return False


def _stores(target, name):
    if isinstance(target, ast.Name):
        return target.id == name
    if isinstance(target, (ast.Tuple, ast.List)):
        return any(_stores(t, name) for t in target.elts)
    if isinstance(target, ast.Starred):
        return _stores(target.value, name)
    return False


KILLED, READ, UNSURE, OPEN = "killed", "read", "unsure", "open"


def _scan(stmts, name):
    """Follow `stmts` in order: KILLED (reassigned before any read on every path), READ (maybe read), or OPEN
    (falls off the end with the value still possibly live). Returns (verdict, line of the kill or the read)."""
    for stmt in stmts:
        if isinstance(stmt, ast.Assign):
            if _reads(stmt.value, name) or any(not _stores(t, name) and _reads(t, name) for t in stmt.targets):
                return READ, stmt.lineno
            if any(_stores(t, name) for t in stmt.targets):
                return KILLED, stmt.lineno
            continue
        if isinstance(stmt, ast.AnnAssign):
            if (stmt.value is not None and _reads(stmt.value, name)) or _reads(stmt.target, name):
                return READ, stmt.lineno
            if stmt.value is not None and _stores(stmt.target, name):
                return KILLED, stmt.lineno
            continue
        if isinstance(stmt, ast.If):
            if _reads(stmt.test, name):
                return READ, stmt.lineno
            body, body_line = _scan(stmt.body, name)
            other, other_line = _scan(stmt.orelse, name)
            for verdict, line in ((body, body_line), (other, other_line)):
                if verdict in (READ, UNSURE):
                    return verdict, line
            if body == KILLED and other == KILLED:
                return KILLED, max(body_line, other_line)
            continue  # one branch may fall through with the value live: keep following
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            if any(_reads(item, name) for item in stmt.items):
                return READ, stmt.lineno
            verdict, line = _scan(stmt.body, name)
            if verdict != OPEN:
                return verdict, line
            continue
        if isinstance(stmt, (ast.Return, ast.Raise)):
            if _reads(stmt, name):
                return READ, stmt.lineno
            return UNSURE, stmt.lineno  # a path that ends without reassigning it: not the shape we remove
        if isinstance(stmt, (ast.Break, ast.Continue)):
            return UNSURE, stmt.lineno  # the value would reach code we do not follow
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            if _mentions(stmt, name):
                return UNSURE, stmt.lineno
            continue
        if isinstance(stmt, (ast.Expr, ast.AugAssign, ast.Assert, ast.Delete, ast.Pass)):
            if _mentions(stmt, name):
                return READ, stmt.lineno
            continue
        if _mentions(stmt, name):
            return UNSURE, stmt.lineno  # any other (compound) statement that names it: we do not guess
    return OPEN, None


def _removable_value(value, params):
    """The parameter called by `value` when it is `param(simple args)[const]...`, else None."""
    node = value
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            node = node.value
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            break
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in params):
        return None
    simple = (ast.Name, ast.Constant)
    for arg in node.args:
        inner = arg.value if isinstance(arg, ast.Starred) else arg
        if not isinstance(inner, simple):
            return None
    for kw in node.keywords:
        if not isinstance(kw.value, simple):
            return None
    return node.func.id


def _params(func):
    a = func.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return set(names)


def _blocks(func):
    """(chain, enclosing-try) for every statement inside `func` (not inside nested functions); chain is the list of
    (block, index, owner) from the statement's own block outwards, owner being the compound statement that holds the
    block (None for the function body)."""
    out = []

    def visit(stmts, owner, outer, in_try):
        for i, stmt in enumerate(stmts):
            chain = [(stmts, i, owner)] + outer
            out.append((chain, in_try))
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            is_try = isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar"
            for field in ("body", "orelse", "finalbody"):
                visit(getattr(stmt, field, []) or [], stmt, chain, in_try or is_try)
            for handler in getattr(stmt, "handlers", []) or []:
                visit(handler.body, stmt, chain, True)
            for case in getattr(stmt, "cases", []) or []:
                visit(case.body, stmt, chain, in_try)
    visit(func.body, None, [], False)
    return out


def _follow(chain, name):
    """Scan what runs after the statement at chain[0]: the rest of its block, then, when the value falls out of an
    if/with block, the rest of the enclosing block, and so on. A loop body's end or the function's end is UNSURE
    (the next iteration, or the caller's view, is not followed)."""
    for block, index, owner in chain:
        verdict, line = _scan(block[index + 1:], name)
        if verdict != OPEN:
            return verdict, line
        if not isinstance(owner, (ast.If, ast.With, ast.AsyncWith)):
            return UNSURE, None
    return UNSURE, None


def find_dead_forwards(func):
    """Analyse a FunctionDef. Returns (list of DeadForward, list of reasons for the candidates refused).

    A forward whose value is read (the one that trains) is neither found nor refused."""
    params = _params(func)
    found, refused = [], []
    dynamic = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in DYNAMIC
                  for n in ast.walk(func))
    for chain, in_try in _blocks(func):
        block, index, _ = chain[0]
        stmt = block[index]
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        callee = _removable_value(stmt.value, params)
        if callee is None:
            continue
        name = stmt.targets[0].id
        where = f"line {stmt.lineno}: {name} = {callee}(...)"
        verdict, line = _follow(chain, name)
        if verdict == READ:
            continue  # a live forward (the one training uses): nothing to report
        if verdict == UNSURE:
            refused.append(f"{where}: not provably reassigned before every read"
                           + (f" (stopped at line {line})" if line else " (the value can leave the block)"))
            continue
        nested = [n for n in ast.walk(func) if n is not func and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                                ast.Lambda, ast.ClassDef))]
        if in_try:
            refused.append(f"{where} is inside try: a handler could see the value")
        elif dynamic:
            refused.append(f"{where}: the function calls locals()/vars()/eval()/exec()")
        elif any(_mentions(n, name) for n in nested) or any(
                isinstance(n, (ast.Global, ast.Nonlocal)) and name in n.names for n in ast.walk(func)):
            refused.append(f"{where}: {name} is global/nonlocal or used by an inner function")
        else:
            found.append(DeadForward(stmt, name, callee, line))
    return found, refused
