"""Loading a checkpoint never unpickles arbitrary objects.

A torch_dist checkpoint holds two pickles that stock loading trusts: torch DCP's ``.metadata``
(read with ``pickle.load``) and every byte object, such as Megatron-Core's common state and
``_extra_state`` entries (read with ``torch.load(weights_only=False)``). Inside
:func:`safe_unpickling` the first is read by an unpickler that admits only DCP's metadata
records, torch sizes and dtypes, and the second with ``weights_only=True``. A file that asks for
anything else raises :class:`UnsafeCheckpointError` naming what it asked for.
"""

from __future__ import annotations

import contextlib
import pickle
import types
from typing import Iterator

import torch

from mimo_builder._internal.platform.patching import Patches
from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.platform.private import set_element

_DCP = "torch.distributed.checkpoint"
_RECORD_MODULES = {f"{_DCP}.metadata", f"{_DCP}.planner"}
_ALLOWED_NAMES = {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
                  ("collections", "OrderedDict"), ("torch", "Size"),
                  (f"{_DCP}.filesystem", "_StoragePrefix")}  # a dataclass of one str: a cached save plan's
_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool", "slice"}


class UnsafeCheckpointError(MimoError, pickle.UnpicklingError):
    """A checkpoint file asked to load something other than plain data and tensors."""


class _RecordsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)
        if _allowed(module, name, found):
            return found
        raise UnsafeCheckpointError(f"checkpoint metadata asks to load {module}.{name}, which is not a "
                                    "torch.distributed.checkpoint record; refusing to unpickle it")


def _allowed(module: str, name: str, found: object) -> bool:
    if (module, name) in _ALLOWED_NAMES:
        return True
    if module == "builtins":
        return name in _BUILTINS
    if module == "torch":
        return isinstance(found, torch.dtype)
    if module in _RECORD_MODULES:
        return isinstance(found, type) or name == "_MEM_FORMAT_ENCODING"
    return False


def _load_records(file, **kwargs):
    return _RecordsOnly(file).load()


def _load_bytes_as_data(self, read_item, value) -> None:
    try:
        loaded = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data or "
                                    f"tensors; refusing to unpickle it ({str(err).splitlines()[0]})") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def safe_unpickling() -> Iterator[None]:
    """Within the block, checkpoint reads admit plain data, tensors and DCP's metadata records only."""
    from torch.distributed.checkpoint import default_planner, filesystem

    patches = Patches()
    patches.patch(filesystem, "pickle", types.SimpleNamespace(load=_load_records, dump=pickle.dump))
    patches.patch(default_planner.DefaultLoadPlanner, "load_bytes", _load_bytes_as_data)
    try:
        yield
    finally:
        patches.undo()
