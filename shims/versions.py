"""Installed versions from package metadata (never by importing the package) and PEP 440 range checks."""

from __future__ import annotations


def installed(distribution):
    """The installed version of `distribution`, or None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def verdict(patch, version, distribution=None):
    """(status, reason) when the patch must not apply to `distribution` (default: the patch's) at this version.

    status is "fixed-upstream" (at or above `fixed_in`) or "skipped" (outside `supported`).
    """
    if version is None:
        return None
    distribution = distribution or patch.distribution
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    try:
        parsed = Version(version)
    except InvalidVersion:
        return ("skipped", f"{distribution} version {version!r} is not a PEP 440 version")
    if patch.fixed_in and parsed >= Version(patch.fixed_in):
        where = f" ({patch.upstream})" if patch.upstream else ""
        return ("fixed-upstream", f"{distribution} {version} >= {patch.fixed_in}, where upstream fixed it{where}")
    if patch.supported and parsed not in SpecifierSet(patch.supported):
        return ("skipped", f"{distribution} {version} is outside the supported range {patch.supported}")
    return None
