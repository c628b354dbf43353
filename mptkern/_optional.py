"""Optional third-party packages: import them or fail with one line that says how to install them.

``MissingDependency`` is an ``ImportError`` whose message names the package and the pip command
(with the version range mptkern declares for it); ``mptkern``'s command line prints that line and
exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from packaging.requirements import Requirement


class MissingDependency(ImportError):
    """An optional package is not installed; the message is the one line to show the user."""


def declared(package: str) -> str:
    """The requirement mptkern declares for ``package`` (e.g. ``"datasets>=3.0,<5.3"``), or the bare name."""
    try:
        requires = importlib.metadata.requires("mptkern") or []
    except importlib.metadata.PackageNotFoundError:
        return package
    for line in requires:
        req = Requirement(line)
        if req.name.lower().replace("_", "-") == package.lower().replace("_", "-"):
            return f"{req.name}{req.specifier}"
    return package


def require(module: str, package: str | None = None, *, purpose: str):
    """``import module`` or raise :class:`MissingDependency` naming ``package`` and its install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is not: a real error, keep it
        package = package or module.split(".")[0]
        raise MissingDependency(f"{purpose} needs {package}, which is not installed: "
                                f"pip install '{declared(package)}'") from None
