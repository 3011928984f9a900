"""Installed versions from package metadata (never by importing the package) and PEP 440 range checks."""

from __future__ import annotations


def installed(distribution):
    """The installed version of `distribution`, or None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _parse(version):
    from packaging.version import InvalidVersion, Version
    try:
        return Version(version)
    except InvalidVersion:
        return None


def _inside(parsed, specifier):
    from packaging.specifiers import SpecifierSet
    # a local build tag (torch 2.0.1+cu117) is the release it builds: compare the public version
    return _public(parsed) in SpecifierSet(specifier, prereleases=True)


def _public(parsed):
    from packaging.version import Version
    return Version(parsed.public)


def verdict(patch, version, distribution=None, supported=None, fixed_in=None):
    """(status, reason) when the patch must not apply to `distribution` (default: the patch's) at this version.

    status is "fixed-upstream" (at or above `fixed_in`) or "skipped" (outside `supported`). `supported` and
    `fixed_in` default to the patch's own.
    """
    if version is None:
        return None
    distribution = distribution or patch.distribution
    supported = patch.supported if supported is None else supported
    fixed_in = patch.fixed_in if fixed_in is None else fixed_in
    parsed = _parse(version)
    if parsed is None:
        return ("skipped", f"{distribution} version {version!r} is not a PEP 440 version")
    if fixed_in and _public(parsed) >= _public(_parse(fixed_in)):
        where = f" ({patch.upstream})" if patch.upstream else ""
        return ("fixed-upstream", f"{distribution} {version} >= {fixed_in}, where upstream fixed it{where}")
    if supported and not _inside(parsed, supported):
        return ("skipped", f"{distribution} {version} is outside the supported range {supported}")
    return None


def torch_verdict(torch_range, version):
    """(status, reason) when the installed torch is outside `torch_range`; None when inside, unknown or unset."""
    if not torch_range or version is None:
        return None
    parsed = _parse(version)
    if parsed is None:
        return ("skipped", f"torch version {version!r} is not a PEP 440 version")
    if not _inside(parsed, torch_range):
        return ("skipped", f"torch {version} is outside the range {torch_range} this target supports")
    return None


def target_verdict(patch, target, record=None):
    """The verdict for one target: its framework's version first (a release that fixed the bug may also have moved
    the function), then torch's. Sets record.version to the framework's installed version."""
    distribution, supported, fixed_in, torch_range = target.ranges(patch)
    if distribution:
        version = installed(distribution)
        if record is not None:
            record.version = version
        found = verdict(patch, version, distribution, supported, fixed_in)
        if found is not None:
            return found
    if torch_range and distribution != "torch":
        return torch_verdict(torch_range, installed("torch"))
    return None
