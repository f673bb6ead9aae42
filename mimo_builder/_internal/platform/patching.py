"""Replacing attributes of other libraries and putting them back: the mechanism behind
:mod:`mimo_builder._internal.platform.compat`'s workarounds (and the checkpoint loader's safe unpickling)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Patch = Callable[[object, str, object], None]
"""``patch(owner, name, value)``: replace ``owner.name``, remembering the original."""


@dataclass(frozen=True)
class Workaround:
    """One CPU workaround: a name, the MCore behaviour it answers, and how to apply it.

    ``apply`` replaces attributes through the ``patch`` it is given; ``None`` marks a workaround
    that is a scope instead (:func:`mimo_builder._internal.platform.compat.cuda_factories_on_cpu`), entered around the MCore calls that
    need it and never installed process-wide.
    """

    name: str
    reason: str
    apply: Callable[[Patch], None] | None
    needed_on: Callable[[torch.device], bool] = lambda device: device.type == "cpu"
    """Which processes install it: CPU only, unless it answers something CUDA lacks too."""


class Patches:
    """Attributes replaced by workarounds, with their originals, so they can be put back."""

    def __init__(self):
        self.applied: set[str] = set()
        self._saved: list[tuple[object, str, object]] = []

    def patch(self, owner: object, name: str, value: object) -> None:
        """Replace ``owner.name`` with ``value``, remembering the original."""
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def apply(self, workaround: Workaround) -> None:
        """Apply a workaround through :meth:`patch` and record its name."""
        workaround.apply(self.patch)
        self.applied.add(workaround.name)

    def undo(self) -> None:
        """Put every replaced attribute back, the latest first."""
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        self.applied.clear()


@contextlib.contextmanager
def replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block and its original after it."""
    patches = Patches()
    patches.patch(owner, name, value)
    try:
        yield
    finally:
        patches.undo()
