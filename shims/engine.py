"""The engine: applies the enabled patches when their targets appear, reverts them, and keeps the receipt.

One engine per process (`get()`). `enable(config)` is idempotent: the same configuration twice changes nothing; a
different one reverts the first. Every patch runs inside `_apply`, which catches everything: a failing patch is
recorded and its target left as it was, unless strict mode asks for an exception.
"""

from __future__ import annotations

import os
import sys
import threading

from shims import hooks
from shims.errors import ShimsConfigError, ShimsPatchError
from shims.patch import MAIN, Context, Skip
from shims import receipt
from shims.receipt import Receipt

MAIN_MODULES = ("__main__", "__mp_main__")  # a script run directly, and the same script in a spawn child
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup", "bootstrap")


class _Applied:
    """A replaced attribute: where it lives (object attribute or dict item), the original and the replacement."""

    __slots__ = ("owner", "attr", "original", "replacement", "is_dict")

    def __init__(self, owner, attr, original, replacement):
        self.owner, self.attr, self.original, self.replacement = owner, attr, original, replacement
        self.is_dict = isinstance(owner, dict)

    def current(self):
        if self.is_dict:
            return self.owner.get(self.attr)
        if isinstance(self.owner, type):
            return self.owner.__dict__.get(self.attr)
        return getattr(self.owner, self.attr, None)

    def put(self, value):
        if self.is_dict:
            self.owner[self.attr] = value
        else:
            setattr(self.owner, self.attr, value)


def _lookup(owner, attr):
    """The attribute as stored (a class's staticmethod stays a staticmethod), or AttributeError."""
    if isinstance(owner, type) and attr in owner.__dict__:
        return owner.__dict__[attr]
    return getattr(owner, attr)


class Engine:
    def __init__(self):
        self.config = None
        self.registry = ()
        self.receipt = Receipt()
        self.applied = {}  # (patch name, Target) -> _Applied
        self.active = False
        self._targets = {}  # module name -> [(patch, target)] for the enabled patches
        self._main_targets = []  # [(patch, target)] whose module is MAIN
        self._main_tried = {}  # (patch name, target) -> the script function last handled
        self._reverts = []
        self._lock = threading.RLock()
        self._exit_registered = False
        self._watches = []
        self._options = {}  # patch name -> option values (a plug-in's are read when it loads)
        self._plugins_by_trigger = {}  # module name -> [registry.Plugin] imported when that module is

    # ---------------------------------------------------------------- enable / disable

    def enable(self, config, registry):
        with self._lock:
            if self.active and _same_configuration(config, self.config):
                return self
            if self.active:
                self.disable()
            from shims import _log, registry as registry_module
            _log.set_level(config.log)
            self.config, self.registry, self.active = config, registry, True
            self.receipt.mode, self.receipt.strict = config.mode, config.strict
            self._targets, self._main_targets = {}, []
            self._options, self._plugins_by_trigger = dict(config.options), {}
            for name, problem in registry_module.broken().items():
                rec = self.receipt.record(name)
                where = registry_module.broken_where(name)
                rec.target(where, receipt.ERROR, problem if problem.startswith("refused:")
                           else f"patch module failed to import: {problem}")
                if config.strict:
                    raise ShimsPatchError(f"shims patch {name!r} ({where}) cannot be used: {problem}")
            for patch in registry:
                if isinstance(patch, registry_module.Plugin) and not patch.loaded:
                    rec = self.receipt.record(patch.name, origin=patch.origin)
                    rec.disabled_reason = config.why_off.get(patch.name)
                    if rec.disabled_reason is None:
                        self._expect_plugin(patch)
                    continue
                rec = self.receipt.record(patch.name, summary=patch.summary, docs=patch.docs,
                                          distribution=patch.distribution, origin=registry_module.origin(patch))
                rec.disabled_reason = config.why_off.get(patch.name)
                if rec.disabled_reason is not None:
                    continue
                self._expect_targets(patch, rec)
            if not self._exit_registered:
                import atexit
                atexit.register(self._at_exit)
                self._exit_registered = True
            if config.mode == "detect":
                self._targets.setdefault("torch", [])
            for module_name in list(self._targets):
                hooks.when_imported(module_name, self._on_import)
            if config.patches or config.mode == "detect":
                from shims import config as config_module
                config_module.export_for_children(config, BOOTSTRAP_DIR)
            return self

    def _expect_targets(self, patch, rec):
        """Note the targets of an enabled patch, to be applied when their module (or the script's function) appears."""
        options = self._options.get(patch.name)
        if options is None:  # a plug-in loaded after the configuration was read
            options = self._options[patch.name] = {o.name: o.default for o in patch.options}
        for target in patch.resolve_targets(options):
            if str(target) not in rec.targets:
                rec.target(target, receipt.NOT_IMPORTED)
            if target.module == MAIN:
                self._main_targets.append((patch, target))
            else:
                self._targets.setdefault(target.module, []).append((patch, target))
        return options

    def _expect_plugin(self, plugin):
        """A plug-in is imported when its trigger module is (at once when it names none, or it is imported)."""
        if plugin.trigger:
            self._plugins_by_trigger.setdefault(plugin.trigger, []).append(plugin)
            self._targets.setdefault(plugin.trigger, [])
        else:
            self._load_plugin(plugin)

    def _load_plugin(self, plugin):
        """Import a plug-in, read its options, and expect its targets as a built-in's. A plug-in that fails to load
        is an error in the receipt, never the user's import's failure (strict mode: ShimsPatchError)."""
        rec = self.receipt.record(plugin.name, origin=plugin.origin)
        try:
            from shims import config as config_module
            patch = plugin.load()
            prefix = f"SHIMS_{patch.name.upper()}_"
            known = {prefix + option.name for option in patch.options}
            unknown = sorted(v for v in self.config.source if v.startswith(prefix) and v not in known)
            if unknown:
                raise ShimsConfigError(f"unknown variable {unknown[0]}={self.config.source[unknown[0]]!r}; valid for "
                                       f"this plug-in: {', '.join(sorted(known)) or 'none (it declares no options)'}")
            self._options[patch.name] = config_module.patch_options(patch, self.config.source)
        except Exception as exc:  # noqa: BLE001 - never break the user's import
            rec.target(plugin.entry_point, receipt.ERROR, f"plug-in failed to load: {type(exc).__name__}: {exc}")
            self._log().warning("plug-in %s (%s) failed to load: %s: %s", plugin.name, plugin.origin,
                                type(exc).__name__, exc)
            if self.config.strict:
                raise ShimsPatchError(f"shims plug-in {plugin.name!r} ({plugin.origin}) failed to load: "
                                      f"{type(exc).__name__}: {exc}") from exc
            return
        rec.summary, rec.docs, rec.distribution = patch.summary, patch.docs, patch.distribution
        before = set(self._targets)
        self._expect_targets(patch, rec)
        for module_name in [m for m in self._targets if m not in before]:
            hooks.when_imported(module_name, self._on_import)  # at once for a module already imported

    def disable(self):
        """Put every replaced attribute back (`is` the original again) and stop reacting to imports."""
        with self._lock:
            if not self.active:
                return
            self.active = False
            hooks.forget(self._on_import)
            for watch in self._watches:
                watch.stop()
            self._watches = []
            for callback in reversed(self._reverts):
                try:
                    callback()
                except Exception as exc:  # noqa: BLE001
                    self._log().warning("a revert callback failed: %s", exc)
            self._reverts = []
            for (name, target), applied in reversed(list(self.applied.items())):
                rec = self.receipt.record(name)
                if applied.current() is applied.replacement:
                    applied.put(applied.original)
                    rec.target(target, receipt.REVERTED, "shims.disable() restored the original")
                else:
                    rec.target(target, receipt.REVERTED, "left alone: something else replaced it after shims did")
            self.applied = {}
            self._main_tried = {}
            from shims import config as config_module
            config_module.withdraw_from_children(BOOTSTRAP_DIR)

    # ---------------------------------------------------------------- applying

    def _on_import(self, module):
        with self._lock:
            if not self.active:
                return
            if module.__name__ == "torch" and self.config.mode == "detect":
                self._install_detectors()
            for plugin in self._plugins_by_trigger.pop(module.__name__, ()):
                self._load_plugin(plugin)
            for patch, target in list(self._targets.get(module.__name__, ())):
                self._apply(patch, target, module, module, target.qualname)

    def apply_in_namespace(self, namespace, module_label):
        """Apply MAIN targets to a script's globals (called by the script watcher). Returns the names still pending."""
        with self._lock:
            if not self.active:
                return set()
            pending = set()
            for patch, target in self._main_targets:
                if "." in target.qualname or target.qualname not in namespace:
                    pending.add(target.qualname)
                    continue
                current = namespace[target.qualname]
                tried = self._main_tried.get((patch.name, target))
                if tried is not None and (current is tried or getattr(current, "__shims_original__", None) is tried):
                    continue  # already handled (applied or skipped) for this very function object
                self._main_tried[(patch.name, target)] = current
                self.applied.pop((patch.name, target), None)  # a redefinition replaces the earlier one
                self._apply(patch, target, None, namespace, target.qualname, label=module_label)
            return pending

    def main_names(self):
        return {t.qualname for _, t in self._main_targets}

    def _apply(self, patch, target, module, owner, qualname, label=None):
        key = (patch.name, target)
        rec = self.receipt.record(patch.name)
        shown = target if label is None else f"{label}:{target.qualname}"
        if label is not None and rec.targets.get(str(target), {}).get("status") == receipt.NOT_IMPORTED:
            del rec.targets[str(target)]
        try:
            # the version verdict comes first: a release that fixed the bug may also have moved the function
            from shims import versions
            verdict = versions.target_verdict(patch, target, rec)
            if verdict is not None:
                raise Skip(verdict[1], status=verdict[0])
            *path, attr = qualname.split(".") if not isinstance(owner, dict) else (qualname,)
            try:
                for part in path:
                    owner = getattr(owner, part)
                original = owner[attr] if isinstance(owner, dict) else _lookup(owner, attr)
            except (AttributeError, KeyError):
                raise Skip(f"{target.module} has no attribute {qualname!r}") from None
            existing = self.applied.get(key)
            if existing is not None:
                if original is existing.replacement:
                    return  # still in place: wrap exactly once
                del self.applied[key]  # the module ran again (reload, re-import): patch its new object
            if getattr(original, "__shims_original__", None) is not None:
                rec.target(shown, receipt.APPLIED, "already patched (by an earlier shims engine)")
                return
            fingerprint, replace, detect = target.functions(patch)
            if fingerprint is not None:
                returned = fingerprint(original)  # raises Skip when the target is not what the patch expects
                if returned is not None:
                    raise TypeError(f"the fingerprint of {shown} returned {returned!r}; a fingerprint returns None "
                                    "or raises shims.patch.Skip(reason)")
            replace = replace if self.config.mode == "fix" else detect
            if replace is None:
                raise Skip("this patch has no observe-only mode" if self.config.mode == "detect"
                           else "this target has no replacement", status=receipt.SKIPPED_BENIGN)
            ctx = Context(patch, target, self._options[patch.name], self.config.mode, self.config.strict, rec,
                          module, self._reverts)
            replacement = replace(original, ctx)
            if replacement is not None and replacement is not original:
                try:
                    replacement.__shims_original__ = original
                except (AttributeError, TypeError):
                    pass
                applied = _Applied(owner, attr, original, replacement)
                applied.put(replacement)
                self.applied[key] = applied
            rec.target(shown, receipt.APPLIED, "observing" if self.config.mode == "detect" else "")
            self._log().info("%s: applied to %s", patch.name, shown)
        except Skip as skip:
            status = receipt.SKIPPED if skip.status == receipt.SKIPPED_BENIGN else skip.status
            rec.target(shown, status, str(skip))
            self._log().info("%s: %s %s: %s", patch.name, status, shown, skip)
            if self.config.strict and skip.status == receipt.SKIPPED:
                raise ShimsPatchError(f"shims patch {patch.name!r} could not apply to {shown}: {skip} "
                                      "(SHIMS_STRICT=1; set SHIMS_STRICT=0 to skip it instead)") from None
        except Exception as exc:  # noqa: BLE001 - never crash the user's import or training
            rec.target(shown, receipt.ERROR, f"{type(exc).__name__}: {exc}")
            self._log().warning("%s: failed on %s, left unpatched: %s: %s", patch.name, shown,
                                type(exc).__name__, exc)
            if self.config.strict:
                raise ShimsPatchError(f"shims patch {patch.name!r} failed on {shown}: {type(exc).__name__}: "
                                      f"{exc}") from exc

    def _install_detectors(self):
        """Generic detectors of the observe-only mode (shims.detect), installed once torch is imported. The only way
        from the engine into shims.detect; it never imports the engine back (it gets `self`)."""
        try:
            import importlib
            detect = importlib.import_module("shims.detect")
            revert = detect.install(self)
            if revert is not None:
                self._reverts.append(revert)
        except Exception as exc:  # noqa: BLE001 - never break the user's `import torch`; the receipt says why
            rec = self.receipt.record("detect")
            rec.target("torch:detectors", receipt.ERROR, f"{type(exc).__name__}: {exc}")
            if self.config.strict:
                raise

    # ---------------------------------------------------------------- scripts

    def watch_script(self, path=None, frame=None):
        """Reach MAIN targets in a script: apply them as soon as the script's module code defines them."""
        with self._lock:
            if not self.active or not self._main_targets:
                return None
            from shims.startup import mainwatch
            watch = mainwatch.start(self, path=path, frame=frame)
            if watch is not None:
                self._watches.append(watch)
            return watch

    # ---------------------------------------------------------------- exit

    def _log(self):
        from shims._log import logger
        return logger()

    def _at_exit(self):
        try:
            if self.config is None:
                return
            from shims import _log, config as config_module
            if not config_module.is_child() or self._did_anything():
                _log.log_receipt(self.receipt)  # one line per process, with pid and rank
            path = self.report_path()
            from shims import config as config_module
            if path and (not config_module.is_child() or self._did_anything()):
                self.receipt.write(path)
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] could not write the receipt: {exc}\n")
        finally:
            self._let_scripts_go()

    def _let_scripts_go(self):
        """Hold nothing of a script's globals after the receipt is written: without shims, the interpreter's teardown
        of `__main__` runs the `__del__` of its module-level objects, which a reference from here would prevent."""
        with self._lock:
            self._main_tried = {}
            for key, applied in list(self.applied.items()):
                if applied.is_dict:  # a script's namespace (MAIN targets)
                    del self.applied[key]
            for watch in self._watches:
                watch.stop()

    def _did_anything(self):
        """A child that reached no target (a resource tracker, an idle worker) writes no report of its own."""
        for rec in self.receipt.records.values():
            if rec.counters or rec.findings or any(t["status"] not in (receipt.NOT_IMPORTED, receipt.DISABLED)
                                                   for t in rec.targets.values()):
                return True
        return False

    def report_path(self):
        path = self.config.report if self.config else None
        if not path:
            return None
        from shims import config as config_module
        if "{pid}" in path:
            return path.replace("{pid}", str(os.getpid()))
        if config_module.is_child():
            root, ext = os.path.splitext(path)
            return f"{root}.{os.getpid()}{ext}"
        return path


def _same_configuration(new, old):
    """Whether two configurations mean the same. The option values follow from the SHIMS_* variables (`source`),
    except that a plug-in's appear once it has loaded: so they are left out of the comparison."""
    first, second = new.as_dict(), old.as_dict()
    first.pop("options"), second.pop("options")
    return first == second


_ENGINE = None


def get():
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
    return _ENGINE


def reset():
    """Disable and forget everything (a fresh engine and receipt). For tests; a user wants shims.disable()."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.disable()
    from shims.startup import mainwatch
    mainwatch._WATCHED.clear()
    _ENGINE = None
