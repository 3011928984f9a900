"""doctr: remove the dead forward from `fit_one_epoch`.

Target   doctr's recognition training scripts, `references/recognition/train_pytorch.py` and `train_pytorch_ddp.py`,
         from PR #604 (2021-11, commit 250a3cb064) to b73d998765 (2025-01-28): python-doctr <= 0.11.0 and forks.
Bug      `train_loss = model(images, targets)["loss"]` runs before `optimizer.zero_grad()` and its result is overwritten
         by the real forward in the amp / else branch: one wasted forward per step (its cost: docs/patches/doctr.md),
         dropout RNG drawn twice and BatchNorm statistics updated twice per step (doctr issue #1861).
Upstream fix: PR #1862, commit 183cf65a52 (first release v0.12.0), which deletes that one statement.
The patch deletes the same statement, found by a rule (deadstore.py, beside this file), not by line number: a
function that does not match exactly is left untouched and the receipt says why. Docs: docs/patches/doctr.md.

The scripts are not in the python-doctr wheel, so the targets are user code: the script being run (`__main__`, or
`__mp_main__` in DDP spawn children) and the modules named by SHIMS_DOCTR_MODULES.
"""

from shims.patch import MAIN, Option, Patch, Skip, Target

DEFAULT_MODULES = ("train_pytorch", "train_pytorch_ddp", "references.recognition.train_pytorch",
                   "references.recognition.train_pytorch_ddp")


def _targets(options):
    functions = ("fit_one_epoch",) + tuple(f for f in options["FUNCTIONS"] if f != "fit_one_epoch")
    modules = tuple(options["MODULES"])
    return tuple(Target(MAIN, f) for f in functions) + tuple(Target(m, f) for m in modules for f in functions)


def _analyse(func):
    """(FunctionDef, filename, dead forwards, refusals) for `func`; raises Skip when it cannot be read."""
    from shims.patches.doctr import deadstore, rewrite
    node, filename = rewrite.function_ast(func)
    found, refused = deadstore.find_dead_forwards(node)
    return node, filename, found, refused


def fingerprint(func):
    """None when `func` has at least one dead forward the rule can remove; raises Skip with the reason otherwise
    ("fixed-upstream" when nothing in it even looks like one: the shape of the upstream fix)."""
    _, _, found, refused = _analyse(func)  # raises Skip when the source cannot be read
    if found:
        return None
    detail = "; ".join(refused) if refused else "no statement assigns a call of a parameter that is then overwritten"
    raise Skip(f"{func.__qualname__} has no dead forward (already fixed upstream, or a different shape): {detail}",
               status="fixed-upstream" if not refused else "skipped")


def remove_dead_forward(original, ctx):
    """The replacement: `original` without its dead forward statements; each removal is counted when it would run."""
    import ast
    from shims.patches.doctr import rewrite
    node, filename, found, _ = _analyse(original)
    def forward_removed():
        ctx.count("forwards_removed")

    dead = {id(d.node) for d in found}

    class Remove(ast.NodeTransformer):
        def visit_Assign(self, stmt):
            if id(stmt) in dead:
                call = ast.Call(func=ast.Name(id="__shims_forward_removed__", ctx=ast.Load()), args=[], keywords=[])
                return ast.copy_location(ast.Expr(value=call), stmt)
            return stmt

    node = Remove().visit(node)
    new = rewrite.compile_function(original, node, filename, {"__shims_forward_removed__": forward_removed})
    ctx.count("functions_rewritten")
    for d in found:
        ctx.note(f"{filename}:{d.lineno}: removed `{d.name} = {d.callee}(...)` (overwritten on every path by line "
                 f"{d.killed_at} before any read)")
    return new


def detect_dead_forward(original, ctx):
    """Observe-only: report each dead forward with its place; change nothing."""
    from shims.patches.doctr import deadstore, rewrite
    node, filename = rewrite.function_ast(original)
    found, _ = deadstore.find_dead_forwards(node)
    for d in found:
        ctx.finding("dead-forward",
                    f"{original.__qualname__} runs {d.callee}(...) into `{d.name}`, overwritten on every path by line "
                    f"{d.killed_at} before any read: one extra forward per step (and a second dropout draw / BatchNorm "
                    "update)",
                    where=f"{filename}:{d.lineno}", cost="one full forward per step (measured: docs/patches/doctr.md)",
                    fix="SHIMS_MODE=fix with the doctr patch (default)")
    return None


PATCH = Patch(
    name="doctr",
    summary="remove the forward whose result fit_one_epoch throws away (doctr #1861, fixed by #1862)",
    targets=_targets,
    replace=remove_dead_forward,
    detect=detect_dead_forward,
    fingerprint=fingerprint,
    distribution=None,
    torch=">=2.0",  # a rewrite of the script's own source: nothing of torch's beyond what the script uses
    options=(
        Option("FUNCTIONS", "list", default=("fit_one_epoch",),
               help="functions to rewrite, in the script and in MODULES (fit_one_epoch is always included)"),
        Option("MODULES", "list", default=DEFAULT_MODULES,
               help="importable modules that define the functions (besides the script being run)"),
    ),
    docs="docs/patches/doctr.md",
    upstream="mindee/doctr#1861, PR #1862 (183cf65a52; first release with the fix: v0.12.0)",
)
