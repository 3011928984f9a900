"""The one place that knows the list of patches: the built-in ones, then the plug-ins other packages declare.

Built-in: each module in `shims.patches` defines `PATCH` (a shims.patch.Patch). Patch modules import only
`shims.patch` at module level (their heavy imports live inside functions), so loading them is cheap enough for
`import shims.auto`.

Plug-ins (docs/plugins.md): a distribution declares, in its metadata,
    [project.entry-points."shims.patches"]         name = "module:PATCH"    the patch, a shims.patch.Patch
    [project.entry-points."shims.patch_triggers"]  name = "framework"       the module whose import loads it
At `import shims.auto` only metadata is read (`Plugin`: name, entry point, trigger, origin); the plug-in's module is
imported when its trigger module is (or when `list` asks for its targets). After that it is treated as a built-in:
the same version ranges, fingerprint, receipt and SHIMS_PATCHES / SHIMS_DISABLE. A plug-in that takes a built-in's
name (or another plug-in's) is refused, with the reason in the receipt and in `python -m shims list`.
"""

from __future__ import annotations

PATCH_MODULES = (
    "doctr",        # duplicate forward in fit_one_epoch (doctr #1861, fixed by #1862)
    "detr",         # model.half() in fp16_eval evaluation (RF-DETR <= 1.5, LW-DETR)
    "ddp",          # find_unused_parameters=True policy (DAMO-YOLO, any DDP)
    "colossalai",   # gradient-reduction tensor hooks fired by autograd.grad (ColossalAI #5601)
    "yolo",         # model.half() on the live EMA in validation (ultralytics < 8.4.62 #24615, YOLOv5, YOLOv7)
)

GROUP = "shims.patches"
TRIGGER_GROUP = "shims.patch_triggers"

_LOADED = None
_BROKEN = {}  # name -> "ExceptionType: message" for patch modules that failed to import, plug-ins refused
_BROKEN_WHERE = {}  # name -> what failed (a module, an entry point), the receipt's target for the problem


def load(import_plugins=False):
    """The tuple of Patch declarations, in the order above, then the plug-ins (`Plugin`, not imported yet). A module
    that fails to import is left out and reported (`broken()`), so one bad patch never takes the others down.

    import_plugins: import every plug-in now (`python -m shims list`); one that fails is left out and reported."""
    global _LOADED
    if import_plugins:
        kept = []
        for patch in load():
            if isinstance(patch, Plugin):
                try:
                    patch.load()
                except Exception as exc:  # noqa: BLE001 - reported by broken(), like a built-in that fails
                    _BROKEN[patch.name] = f"plug-in failed to load ({patch.origin}): {type(exc).__name__}: {exc}"
                    _BROKEN_WHERE[patch.name] = patch.entry_point
                    continue
            kept.append(patch)
        _LOADED = tuple(kept)
    if _LOADED is None:
        import importlib
        _patches_from_source_checkout()
        patches = []
        for name in PATCH_MODULES:
            try:
                patches.append(importlib.import_module(f"shims.patches.{name}").PATCH)
            except Exception as exc:  # noqa: BLE001 - recorded in the receipt, raised in strict mode
                _BROKEN[name] = f"{type(exc).__name__}: {exc}"
                _BROKEN_WHERE[name] = f"shims.patches.{name}"
        _LOADED = tuple(patches) + _plugins(PATCH_MODULES)
    return _LOADED


def origin(patch):
    """Where a patch comes from: "shims" for a built-in, else the plug-in's distribution and entry point."""
    return patch.origin if isinstance(patch, Plugin) else "shims"


def broken_where(name):
    """What failed for an entry of `broken()`: the module or entry point (the receipt's target for the problem)."""
    return _BROKEN_WHERE.get(name, f"shims.patches.{name}")


class PluginError(Exception):
    """A plug-in whose entry point does not give a usable Patch."""


class Plugin:
    """A patch from another distribution, known by its metadata until its module is imported (`load()`).

    Before loading, only `name`, `origin`, `entry_point`, `trigger` are known and `options` is empty; reading any
    other Patch attribute (summary, targets, docs...) loads the plug-in, so `python -m shims list` shows it whole.
    """

    def __init__(self, name, entry_point, trigger, distribution, version):
        self.name, self.entry_point, self.trigger = name, entry_point, trigger
        self.origin = f"plug-in {distribution} {version} ({GROUP}: {name} = {entry_point})"
        self._patch = None

    @property
    def loaded(self):
        return self._patch is not None

    @property
    def options(self):
        return self._patch.options if self._patch is not None else ()

    def load(self):
        """Import the plug-in and return its Patch (once). Raises PluginError or the import's own exception."""
        if self._patch is None:
            import importlib

            from shims.patch import Patch
            module_name, _, attr = self.entry_point.partition(":")
            obj = importlib.import_module(module_name.strip())
            for part in attr.strip().split(".") if attr.strip() else ():
                obj = getattr(obj, part)
            if not isinstance(obj, Patch):
                raise PluginError(f"entry point {self.name} = {self.entry_point} gives a {type(obj).__name__}, "
                                  "not a shims.patch.Patch")
            if obj.name != self.name:
                raise PluginError(f"entry point {self.name!r} gives the patch named {obj.name!r}: the two names "
                                  "must be the same (it is what SHIMS_PATCHES and SHIMS_DISABLE say)")
            self._patch = obj
        return self._patch

    def resolve_targets(self, options):
        patch = self.load()
        values = {o.name: o.default for o in patch.options}
        values.update(options or {})
        return patch.resolve_targets(values)

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __repr__(self):
        return f"<Plugin {self.name} from {self.origin}>"


def _candidate_dist_infos():
    """The metadata folders on sys.path whose entry_points.txt mentions GROUP: folder names and one small file each,
    so that importlib.metadata parses only these (not every distribution's METADATA) at `import shims.auto`."""
    import os
    import sys
    found = []
    for entry in sys.path:
        try:
            listing = os.scandir(entry or ".")
        except OSError:
            continue  # a zip file or a missing folder
        with listing:
            items = sorted(listing, key=lambda item: item.name)  # one order on every file system
        for item in items:
            if not item.name.endswith((".dist-info", ".egg-info")):
                continue
            try:
                with open(os.path.join(item.path, "entry_points.txt"), encoding="utf-8") as f:
                    if f"[{GROUP}]" in f.read():
                        found.append(item.path)
            except OSError:
                continue
    return found


def _plugins(built_in):
    """Plugin declarations from the distributions that declare GROUP entry points (metadata only, nothing imported).
    The first distribution of a name on sys.path wins, as for imports; name clashes are refused into `broken()`."""
    candidates = _candidate_dist_infos()
    if not candidates:
        return ()
    from importlib import metadata
    plugins, seen_dists = [], set()
    for path in candidates:
        # Distribution.at and Distribution.entry_points behave the same on 3.9-3.13; the module-level
        # entry_points() returns a dict of groups on 3.9 and EntryPoint.dist exists only from 3.10
        dist = metadata.Distribution.at(path)
        dist_name = dist.metadata["Name"] or _name_from_folder(path)
        key = dist_name.lower().replace("_", "-").replace(".", "-")
        if key in seen_dists:
            continue
        seen_dists.add(key)
        entry_points = list(dist.entry_points)
        triggers = {ep.name: ep.value for ep in entry_points if ep.group == TRIGGER_GROUP}
        for ep in entry_points:
            if ep.group != GROUP:
                continue
            where = f"{dist_name}:{GROUP}:{ep.name}"
            taken = [p for p in plugins if p.name == ep.name]
            if ep.name in built_in or taken:
                owner = "a patch built into shims" if ep.name in built_in else f"already taken by {taken[0].origin}"
                _BROKEN[f"{ep.name} ({dist_name})"] = (
                    f"refused: {dist_name} declares the patch name {ep.name!r}, which is {owner}; the plug-in must "
                    f"use another name (its {GROUP} entry point and its Patch(name=...))")
                _BROKEN_WHERE[f"{ep.name} ({dist_name})"] = where
                continue
            if not ep.name.isidentifier() or ep.name.lower() != ep.name:
                _BROKEN[f"{ep.name} ({dist_name})"] = (f"refused: the {GROUP} entry point name {ep.name!r} of "
                                                       f"{dist_name} is not a lower-case identifier")
                _BROKEN_WHERE[f"{ep.name} ({dist_name})"] = where
                continue
            plugins.append(Plugin(ep.name, ep.value, triggers.get(ep.name), dist_name, dist.version))
    return tuple(plugins)


def _name_from_folder(path):
    import os
    return os.path.basename(path).split("-")[0]


def _patches_from_source_checkout():
    """In a source checkout on PYTHONPATH (not installed), `patches/` beside `shims/` is loaded as `shims.patches`,
    the name an installation gives it; never as a top-level `patches`."""
    import os
    import sys
    if "shims.patches" in sys.modules:
        return
    import importlib.util
    if importlib.util.find_spec("shims.patches") is not None:
        return  # installed (or an editable install maps it)
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("shims.patches", init, submodule_search_locations=[source])
    module = importlib.util.module_from_spec(spec)
    sys.modules["shims.patches"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - load() reports each patch module that then fails
        del sys.modules["shims.patches"]
        return
    sys.modules["shims"].patches = module


def broken():
    load()
    return dict(_BROKEN)
