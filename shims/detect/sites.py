"""Call sites: which line of the user's code (or of the framework making the call) a finding belongs to.

A frame is internal when its code lives under torch's or shims' own folders (shims.patches included); the answer is
cached per code object, so attribution costs a dict lookup per frame walked.
"""

from __future__ import annotations

import os
import sys


class CallSites:
    def __init__(self, torch, engine):
        self.engine = engine
        self._prefixes = _internal_prefixes(torch)
        self._internal = {}  # code object -> True when the frame is torch's or shims' own
        self._covered = _modules_patches_observe(engine)
        self._framework = {}  # code object -> top-level package name when the code is an installed framework's
        self._reached = {}  # framework file:line -> (package, the user's file:line whose call reached it)

    def is_internal(self, code):
        internal = self._internal.get(code)
        if internal is None:
            internal = self._internal[code] = code.co_filename.startswith(self._prefixes)
        return internal

    def user_frame(self, frame):
        """The first frame at or above `frame` that is neither torch's nor shims' own (None if there is none)."""
        while frame is not None:
            if not self.is_internal(frame.f_code):
                return frame
            frame = frame.f_back
        return None

    def where(self, frame):
        """file:line of the first frame at or above `frame` that is neither torch's nor shims' own. When that frame
        is an installed framework's (site-packages), the user's line that called into it is remembered too
        (reached_from)."""
        frame = self.user_frame(frame)
        if frame is None:
            return None
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        package = self.framework_of(frame)
        if package is not None and where not in self._reached:
            caller = frame.f_back
            while caller is not None and (self.is_internal(caller.f_code) or self.framework_of(caller) is not None):
                caller = caller.f_back
            user = None if caller is None else f"{caller.f_code.co_filename}:{caller.f_lineno}"
            self._reached[where] = (package, user)
        return where

    def framework_of(self, frame):
        """The top-level package of an installed framework running `frame` (None for the user's own code)."""
        code = frame.f_code
        found = self._framework.get(code, False)
        if found is False:
            path = code.co_filename.replace(os.sep, "/")
            found = None
            if "/site-packages/" in path or "/dist-packages/" in path:
                found = (frame.f_globals.get("__name__") or "").split(".")[0] or None
            self._framework[code] = found
        return found

    def reached_from(self, where):
        """For a finding in framework code: {"framework", "framework_version", "user_where"} (the user's line
        whose call reached the framework line `where`); {} for a finding in the user's own code."""
        reached = self._reached.get(where)
        if reached is None:
            return {}
        package, user = reached
        return {"framework": package, "framework_version": _version_of(package), "user_where": user}

    def caller(self, frame):
        """file:line of `frame` when it is user (or framework) code; None when torch or shims itself is calling."""
        code = frame.f_code
        return None if self.is_internal(code) else f"{code.co_filename}:{frame.f_lineno}"

    def covered(self, frame):
        """Whether this frame runs code of a module where a patch's own observe-only check is applied (ColossalAI's
        optimizer registering its reduction hooks, rfdetr's evaluate calling .half()): that patch reports the
        mistake in its terms, so a generic detector does not report it a second time."""
        name = frame.f_globals.get("__name__")
        patches = self._covered.get(name) if self._covered else None
        if not patches:
            return False
        records = self.engine.receipt.records
        for patch in patches:
            record = records.get(patch)
            if record is not None and any(key.startswith(f"{name}:") and target["status"] == "applied"
                                          for key, target in list(record.targets.items())):
                return True
        return False

    def patch_at(self, where, own_record):
        """The patch whose own check already reported this very line (its fix is the one to use), or None."""
        for name, rec in list(self.engine.receipt.records.items()):
            if name != own_record and any(f["where"] == where for f in rec.findings):
                return name
        return None


def _version_of(package):
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib import metadata
        return metadata.version(package)
    except Exception:  # noqa: BLE001 - a package whose distribution has another name
        return None


def _internal_prefixes(torch):
    shims_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # shims/ (this is shims/detect/)
    folders = [os.path.dirname(torch.__file__), shims_folder]
    patches = sys.modules.get("shims.patches")
    if patches is not None and getattr(patches, "__file__", None):
        folders.append(os.path.dirname(os.path.abspath(patches.__file__)))
    return tuple(os.path.join(f, "") for f in folders)


def _modules_patches_observe(engine):
    """module name -> names of the enabled patches with an observe-only check that target a function there."""
    from shims.patch import MAIN
    config, modules = engine.config, {}
    for patch in engine.registry:
        if config is None or patch.detect is None or patch.name not in config.patches:
            continue
        try:
            targets = patch.resolve_targets(config.options[patch.name])
        except Exception:  # noqa: BLE001 - a patch's own problem, reported by the engine
            continue
        for target in targets:
            if target.module not in (MAIN, "torch") and not target.module.startswith("torch."):
                modules.setdefault(target.module, set()).add(patch.name)
    return modules


def after_construction(detector, remember):
    """`make` for session.wrap(cls, "__init__", make): after the original __init__, `remember(obj, where)` with the
    user's line that built `obj` (None when torch or shims built it). A failure switches the detector off, never
    the user's run."""
    def make(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if detector.on:
                try:
                    remember(self, detector.session.where(sys._getframe(1)))
                except Exception as exc:  # noqa: BLE001 - a detector never breaks the user's run
                    detector.session.fail(detector, exc)
        return __init__
    return make
