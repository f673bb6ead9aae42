"""Module paths that moved, kept importable for one minor version with a warning naming the new
import (``CHANGELOG.md`` records each move and the release that drops it).

0.2 moved every internal package under ``mimo_builder._internal`` (and ``build/`` became
``assembly/``); scripts of 0.1 imported from those paths. Each old module resolves to the very
module object of its new path, so classes and state are shared, never loaded twice.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

REMOVED_IN = "0.3"
MOVED_PACKAGES = {name: f"mimo_builder._internal.{name}" for name in (
    "document", "kinds", "validation", "placement", "runtime", "planning", "platform", "checkpoint",
    "data", "hf", "interop", "render", "errors", "cli_args")}
MOVED_PACKAGES["build"] = "mimo_builder._internal.assembly"
KEPT_PUBLIC = {"kinds"}
"""Old packages whose name is a public module again: only their submodules are redirected."""


def new_path(fullname: str) -> str | None:
    """Where module ``fullname`` of 0.1 lives now, or None if it did not move."""
    root, _, rest = fullname.removeprefix("mimo_builder.").partition(".")
    if not fullname.startswith("mimo_builder.") or root not in MOVED_PACKAGES:
        return None
    if root in KEPT_PUBLIC and not rest:
        return None
    return MOVED_PACKAGES[root] + (f".{rest}" if rest else "")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(f"'{spec.name}' moved in mimo-builder 0.2 and goes in {REMOVED_IN}: import the public names "
                      f"from 'mimo_builder' (or 'mimo_builder.kinds'); the private module is '{self.target}'",
                      FutureWarning, stacklevel=_caller_depth())
        module = importlib.import_module(self.target)
        if spec.name == "mimo_builder.build":
            return _callable_package(module)
        return module

    def exec_module(self, module):
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds only the moved paths of 0.1, each as an alias of its new module."""

    def find_spec(self, fullname, path=None, target=None):
        """A spec aliasing ``fullname`` to its new path, or None for any other module."""
        moved = new_path(fullname)
        if moved is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(moved), is_package=True)


class _BuildPackage(types.ModuleType):
    """The old ``mimo_builder.build`` package, still callable as the new ``mimo_builder.build``
    function (importing a submodule of it rebinds that name on the package)."""

    def __call__(self, *args, **kwargs):
        from mimo_builder._internal.api import build

        return build(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(importlib.import_module(MOVED_PACKAGES["build"]), name)


def _callable_package(target: types.ModuleType) -> types.ModuleType:
    package = _BuildPackage("mimo_builder.build", target.__doc__)
    package.__path__ = []  # its submodules come through the finder, as aliases
    return package


def _caller_depth() -> int:
    """The stack level of the frame outside the import machinery that asked for the module."""
    frame, depth = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(("<frozen", __file__)):
        frame, depth = frame.f_back, depth + 1
    return depth


def install_moved_modules() -> None:
    """Put the finder on ``sys.meta_path`` once (before the path finders, which would not find them)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
