"""Post-import hooks, on wrapt's (`wrapt.register_post_import_hook`, the hooks ddtrace and OpenTelemetry rely on).

What shims adds on top, in one place:
- callbacks per module name that can be forgotten again (`forget`, for shims.disable()); wrapt has no removal,
  so wrapt calls one dispatcher per name and the dispatcher calls whatever is registered now;
- a module that executes again (`importlib.reload`, or imported anew after removal from sys.modules) fires again:
  wrapt's hooks are one-shot, so after firing, the dispatcher re-arms itself in wrapt's table (feature-detected: a
  wrapt without that table still patches every first import; only a reloaded target would stay unpatched);
- a module whose import is under way (in sys.modules, its code still running: a plug-in loaded by `import torch`
  at the top of the very module it patches) fires when that import ends, not at once on a half-made module.
"""

from __future__ import annotations

import sys
import threading

_hooks = {}  # module name -> list of callbacks(module)
_armed = set()  # module names whose dispatcher wrapt knows
_lock = threading.RLock()


def _table():
    """wrapt's own registry of pending hooks (name -> list), or None if this wrapt keeps it elsewhere."""
    import wrapt.importer
    table = getattr(wrapt.importer, "_post_import_hooks", None)
    return table if isinstance(table, dict) else None


class _Dispatch:
    """The one hook wrapt holds per module name: calls the callbacks registered now, then re-arms for the next
    execution of the module."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __call__(self, module):
        try:
            for callback in list(_hooks.get(self.name, ())):
                callback(module)  # callbacks catch their own errors (engine); a strict-mode error propagates
        finally:
            self._rearm()

    def _rearm(self):
        import wrapt.importer
        table = _table()
        lock = getattr(wrapt.importer, "_post_import_hooks_lock", None)
        if table is None or lock is None:
            with _lock:
                _armed.discard(self.name)
            return
        with lock:
            hooks = table.setdefault(self.name, [])
            if not any(isinstance(h, _Dispatch) and h.name == self.name for h in hooks):
                hooks.append(self)


def _initializing(module):
    """True while the module's code is still running (importlib sets `__spec__._initializing` around it)."""
    return getattr(getattr(module, "__spec__", None), "_initializing", False) is True


def _fire_when_initialized(module, name):
    """Run the dispatcher for `name` when the import of `module`, under way now, ends. importlib has no hook for that
    moment; it does set `spec._initializing = False` on the module's spec as its last step (3.9-3.13), so the spec
    gets, for that one assignment, a subclass that notices it and then becomes a plain ModuleSpec again."""
    spec = module.__spec__
    base = type(spec)

    class SpecUntilInitialized(base):
        def __setattr__(self, key, value):
            base.__setattr__(self, key, value)
            if key == "_initializing" and value is False:
                base.__setattr__(self, "__class__", base)
                _Dispatch(name)(sys.modules.get(name, module))

    try:
        spec.__class__ = SpecUntilInitialized
    except TypeError:  # a spec type that refuses it: fire now, as wrapt would
        _Dispatch(name)(module)


def when_imported(name, callback):
    """Call `callback(module)` after module `name` is imported; at once if it is already in sys.modules.

    Registering the same callback twice for one name has no effect (idempotent).
    """
    with _lock:
        callbacks = _hooks.setdefault(name, [])
        if callback in callbacks:
            return
        callbacks.append(callback)
        first = name not in _armed
        _armed.add(name)
    module = sys.modules.get(name)
    if module is not None and _initializing(module):
        if first:  # otherwise the dispatcher armed earlier runs every callback when this import ends
            _fire_when_initialized(module, name)
        return
    if first:
        import wrapt
        # fires at once (calling every callback so far) when the module is already imported, else after its import
        wrapt.register_post_import_hook(_Dispatch(name), name)
        return
    if module is not None:
        callback(module)


def forget(callback):
    """Remove `callback` from every module's hook list (used by shims.disable)."""
    with _lock:
        for name in list(_hooks):
            _hooks[name] = [c for c in _hooks[name] if c != callback]
            if not _hooks[name]:
                del _hooks[name]
