"""What a patch is: one small declarative shape, shared by every module in `shims.patches`.

A patch names the attributes it replaces (`Target`: a module and a qualified name inside it), the distribution whose
version decides whether it applies, and one function, `replace(original, ctx)`, that returns the object to put in the
original's place. The engine (`shims.engine`) does the rest: it waits for the target module to be imported, checks the
version and the fingerprint, swaps the attribute, remembers the original for `shims.disable()`, and writes the receipt.

This module is imported by `import shims.auto`, so it imports nothing beyond the standard library's cheapest parts.
"""

from __future__ import annotations

MAIN = "__main__"  # a Target in the script being run; also matched in multiprocessing spawn children (__mp_main__)


class Skip(Exception):
    """Raised by `fingerprint`, `replace` or `detect` to leave a target untouched; the message is the receipt's reason.

    status (the constants of shims.receipt):
        "skipped"         could not apply (version, shape, missing method): recorded; strict mode raises
        "skipped-benign"  nothing to do and nothing wrong: recorded as "skipped"; strict mode does not raise
        "fixed-upstream"  the target already has the upstream fix: recorded; strict mode does not raise
    """

    def __init__(self, reason, status="skipped"):
        if status not in ("skipped", "skipped-benign", "fixed-upstream"):  # shims.receipt.SKIP_STATUSES
            raise ValueError(f"Skip status {status!r} is not one of skipped, skipped-benign, fixed-upstream")
        super().__init__(reason)
        self.status = status


def function_def(func):
    """(the function under its decorators, its `def` parsed with the file's line numbers, its parameter names) for a
    patch that checks a target's shape in its source; raises Skip when `func` is no Python function or its source is
    not readable. The imports are local: this module is loaded by `import shims.auto`."""
    import ast
    import inspect
    import textwrap
    import types
    unwrapped = inspect.unwrap(func)  # decorated validators and evaluators (no_grad, smart_inference_mode)
    if not isinstance(unwrapped, types.FunctionType):
        raise Skip(f"{func!r} is not a Python function")
    try:
        lines, first = inspect.getsourcelines(unwrapped)
    except (OSError, TypeError) as exc:
        raise Skip(f"source of {unwrapped.__qualname__} is not available: {exc}") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != unwrapped.__name__:
        raise Skip(f"source of {unwrapped.__qualname__} does not start with its def")
    args = node.args
    return unwrapped, node, {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}


class Option:
    """A per-patch setting read from `SHIMS_<PATCH>_<NAME>` (validated in `shims.config`).

    kind: "choice" (one of `choices`), "list" (comma-separated words), "sites" (comma-separated `module:function`),
    "str" (any text), "int" (an integer from `minimum` (default 0: counts) to `maximum` (default: none)).
    """

    __slots__ = ("name", "kind", "choices", "default", "help", "minimum", "maximum")

    def __init__(self, name, kind="choice", *, default=None, choices=(), help="", minimum=0, maximum=None):
        if kind not in ("choice", "list", "sites", "str", "int"):
            raise ValueError(f"Option kind {kind!r} is not one of choice, list, sites, str, int")
        self.name, self.kind, self.choices, self.default, self.help = name.upper(), kind, tuple(choices), default, help
        self.minimum, self.maximum = minimum, maximum


class Target:
    """One attribute a patch replaces: `qualname` ("func" or "Class.method") inside module `module`.

    `module` may be `MAIN` for functions defined in the script being run (and in its spawn children).
    `distribution`: the package whose version decides this target, when it differs from the patch's own (a patch for
    a framework and for user code that copied it, like detr).
    `supported`, `fixed_in`, `torch`: this target's own ranges where they differ from the patch's (ColossalAI's
    LowLevelZero was fixed upstream in 0.3.7, its GeminiDDP never was); None means the patch's.
    `replace`, `detect`, `fingerprint`: this target's own functions where its shape differs from the other targets'
    (a method that queues gradients and one that empties the queue need different replacements); None means the
    patch's. The same contracts as on `Patch`.
    """

    __slots__ = ("module", "qualname", "distribution", "supported", "fixed_in", "torch", "replace", "detect",
                 "fingerprint")

    def __init__(self, module, qualname, distribution=None, *, supported=None, fixed_in=None, torch=None,
                 replace=None, detect=None, fingerprint=None):
        self.module, self.qualname, self.distribution = module, qualname, distribution
        self.supported, self.fixed_in, self.torch = supported, fixed_in, torch
        self.replace, self.detect, self.fingerprint = replace, detect, fingerprint

    def __repr__(self):
        return f"{self.module}:{self.qualname}"

    def __eq__(self, other):
        return isinstance(other, Target) and (self.module, self.qualname) == (other.module, other.qualname)

    def __hash__(self):
        return hash((self.module, self.qualname))

    def ranges(self, patch):
        """(distribution, supported, fixed_in, torch range) in force for this target of `patch`."""
        pick = lambda own, inherited: inherited if own is None else own  # noqa: E731
        return (self.distribution or patch.distribution, pick(self.supported, patch.supported),
                pick(self.fixed_in, patch.fixed_in), pick(self.torch, patch.torch))

    def functions(self, patch):
        """(fingerprint, replace, detect) in force for this target of `patch`: its own, else the patch's."""
        pick = lambda own, inherited: inherited if own is None else own  # noqa: E731
        return (pick(self.fingerprint, patch.fingerprint), pick(self.replace, patch.replace),
                pick(self.detect, patch.detect))


class Patch:
    """The declaration of one patch. Immutable once built.

    name          short lower-case name used in SHIMS_PATCHES / SHIMS_DISABLE and as the options' prefix
    summary       one line: the mistake it fixes
    targets       a tuple of `Target`, or a function `options -> tuple of Target` when the options decide them
    replace       `replace(original, ctx) -> replacement` (may raise `Skip`); the heart of the patch. None here is
                  allowed when every target brings its own (`Target(replace=...)`)
    distribution  the installed distribution whose version matters (None for user code, e.g. scripts)
    supported     PEP 440 specifier of the versions the patch was written for ("" = any)
    fixed_in      first version where upstream fixed the bug: at or above it the patch says "fixed upstream"
    torch         PEP 440 specifier of the torch releases the patch works with ("" = any); shims itself never
                  requires torch, so a target outside this range is refused with the reason in the receipt
                  (a Target may narrow `supported`, `fixed_in` and `torch` for itself)
    fingerprint   `fingerprint(original) -> None`, called before `replace`/`detect` on the object found at the target:
                  returns None when it has the shape the patch was written for, raises `Skip(reason)` when not
                  (`status="fixed-upstream"` when the shape shows the upstream fix). Any other return value is a
                  contract error, recorded as "error" (see docs/plugins.md)
    detect        `detect(original, ctx) -> None | replacement`: observe-only variant used when SHIMS_MODE=detect
    (a Target may bring its own `replace`, `detect` and `fingerprint`: they take the patch's place for that target)
    options       tuple of `Option`
    docs          path of the patch's documentation page in the repository
    """

    __slots__ = ("name", "summary", "targets", "replace", "distribution", "supported", "fixed_in", "fingerprint",
                 "detect", "options", "docs", "upstream", "torch")

    def __init__(self, *, name, summary, targets, replace=None, distribution=None, supported="", fixed_in=None,
                 fingerprint=None, detect=None, options=(), docs="", upstream="", torch=""):
        if not name.isidentifier() or name.lower() != name:
            raise ValueError(f"patch name {name!r} must be a lower-case identifier")
        values = dict(name=name, summary=summary, targets=targets, replace=replace, distribution=distribution,
                      supported=supported, fixed_in=fixed_in, fingerprint=fingerprint, detect=detect,
                      options=tuple(options), docs=docs, upstream=upstream, torch=torch)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError(f"Patch {self.name!r} is immutable")

    def resolve_targets(self, options):
        """The targets for these option values (a tuple of Target)."""
        targets = self.targets(options) if callable(self.targets) else self.targets
        return tuple(targets)

    def __repr__(self):
        return f"<Patch {self.name}>"


_WRAPPER_CLASSES = None


def _wrapper_classes():
    """wrapt's FunctionWrapper with `__shims_original__` kept on the wrapper itself: a plain attribute set on a wrapt
    proxy would land on the wrapped function, and mark the original as patched."""
    global _WRAPPER_CLASSES
    if _WRAPPER_CLASSES is None:
        import wrapt

        class BoundShimsWrapper(wrapt.BoundFunctionWrapper):
            @property
            def __shims_original__(self):
                parent = self._self_parent
                return getattr(parent, "_self_shims_original", None) if parent is not None else None

        class ShimsWrapper(wrapt.FunctionWrapper):
            __bound_function_wrapper__ = BoundShimsWrapper

            @property
            def __shims_original__(self):
                return getattr(self, "_self_shims_original", None)

            @__shims_original__.setter
            def __shims_original__(self, value):
                self._self_shims_original = value

        _WRAPPER_CLASSES = ShimsWrapper, BoundShimsWrapper
    return _WRAPPER_CLASSES


def wrap(original, around):
    """A wrapt FunctionWrapper: calls `around(wrapped, instance, args, kwargs)` in place of `original`.

    The usual shape of a replacement that runs the original with something before, after or around it (DDP's
    constructor, an evaluate function, an optimizer method). It keeps the original's name, signature, docstring and
    `__wrapped__`, binds like the original (function, method, staticmethod, classmethod), and the engine records the
    original on it as `__shims_original__`. Not for what torch.compile traces (a module's forward, a Tensor method):
    a proxy there is a graph break.
    """
    return _wrapper_classes()[0](original, around)


class Context:
    """What `replace` / `detect` get besides the original: where they are, the options, and how to report.

A patch reports only through these methods; `ctx.record` is the engine's receipt entry, not part of the contract.

    ctx.count(name, n)    add to a counter shown in the receipt (thread-safe; cheap enough for a training step)
    ctx.note(text)        a line in the receipt for this target
    ctx.error(reason)     this target's status becomes "error" with `reason`, for a failure the patch handled itself
                          after it was applied (the original behaviour ran instead; strict mode: raise, not this)
    ctx.version(text)     the version the receipt shows for this patch, when no distribution of the patch says it
    ctx.finding(...)      an observation for the observe-only mode (see shims.receipt.PatchRecord.finding)
    ctx.options           this patch's options, e.g. ctx.options["FUNCTIONS"]
    ctx.target, ctx.mode  the Target being replaced, and "fix" or "detect"
    ctx.strict            whether SHIMS_STRICT is on (a patch's own runtime fallbacks should raise instead)
    ctx.on_revert(fn)     call fn() at shims.disable(), for state a patch keeps beyond the replaced attribute
    """

    __slots__ = ("patch", "target", "options", "mode", "strict", "record", "module", "_reverts")

    def __init__(self, patch, target, options, mode, strict, record, module, reverts=None):
        self.patch, self.target, self.options, self.mode = patch, target, options, mode
        self.strict, self.record, self.module = strict, record, module
        self._reverts = reverts if reverts is not None else []

    def on_revert(self, callback):
        self._reverts.append(callback)

    def count(self, name, n=1):
        self.record.count(name, n)

    def note(self, text):
        self.record.note(f"{self.target}: {text}")

    def error(self, reason):
        self.record.target(self.target, "error", reason)

    def version(self, text):
        self.record.version = text

    def finding(self, kind, message, *, where=None, cost=None, fix=None, count=1):
        return self.record.finding(kind, message, where=where, cost=cost, fix=fix, count=count)

    def logger(self):
        from shims._log import logger
        return logger()
