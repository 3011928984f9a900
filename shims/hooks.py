"""Post-import hooks: run a callback right after a named module finishes executing, or at once if it already has.

Why not `wrapt.importer`: importing wrapt 2.x pulls in asyncio (about 110 ms here), five times the budget of
`import shims.auto` (20 ms). This is the same mechanism (a meta-path finder that chains the real loader), kept to
what shims needs: hooks keyed by the exact module name, fired once per import, never breaking the import.
"""

from __future__ import annotations

import sys

_hooks = {}  # module name -> list of callbacks(module)
_searching = set()  # names being looked up by our own find_spec (prevents recursion)


def _fire(module):
    for callback in list(_hooks.get(module.__name__, ())):
        callback(module)  # callbacks catch their own errors (engine); a strict-mode error propagates on purpose


class _ChainedLoader:
    """Wraps the real loader; after the module executes, fires the hooks. Restores the real loader on the module."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # put the real loader back first: code that inspects module.__loader__ sees the original
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _fire(sys.modules.get(module.__name__, module))


class _PostImportFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks or fullname in _searching:
            return None
        import importlib.util
        _searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        except (ImportError, ValueError):
            return None
        finally:
            _searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ChainedLoader(spec.loader)
        return spec


_FINDER = _PostImportFinder()


def when_imported(name, callback):
    """Call `callback(module)` after module `name` is imported; at once if it is already in sys.modules.

    Registering the same callback twice for one name has no effect (idempotent).
    """
    callbacks = _hooks.setdefault(name, [])
    if callback in callbacks:
        return
    callbacks.append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    module = sys.modules.get(name)
    if module is not None:
        callback(module)


def forget(callback):
    """Remove `callback` from every module's hook list (used by shims.disable)."""
    for name in list(_hooks):
        _hooks[name] = [c for c in _hooks[name] if c != callback]
        if not _hooks[name]:
            del _hooks[name]
    if not _hooks and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
