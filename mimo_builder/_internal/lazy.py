"""Public names resolved on first use (PEP 562), so importing a public module imports neither
torch nor Megatron-Core until a name that needs them is touched."""

from __future__ import annotations

import importlib
from typing import Any


class LazyNames:
    """A public module's names, each read from the private module that defines it."""

    def __init__(self, module: str, names: dict[str, str]):
        self.module = module
        self.names = names
        """Public name -> ``"private.module"`` (its attribute of the same name),
        ``"private.module:attribute"``, or ``"private.module:*"`` (the module itself)."""

    def get(self, name: str) -> Any:
        """The object behind public ``name`` (``AttributeError`` for any other name)."""
        target = self.names.get(name)
        if target is None:
            raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
        module, _, attribute = target.partition(":")
        loaded = importlib.import_module(module)
        return loaded if attribute == "*" else getattr(loaded, attribute or name)

    def dir(self, module_globals: dict[str, Any]) -> list[str]:
        """What ``dir(module)`` lists: the module's own globals and every public name."""
        return sorted({*module_globals, *self.names})
