"""Megatron-Energon loader states as JSON, and back, without unpickling.

Energon's ``SavableDataLoader.save_state_rank()`` returns nested energon dataclasses, its
``FlexState`` dicts, Python scalars, bytes, numpy arrays and torch tensors (generator states).
:func:`encode` turns such a state into JSON values; :func:`decode` rebuilds it, creating only
dataclasses defined under ``megatron.energon`` (set field by field: no constructor, no pickle),
so a checkpoint's data state cannot run code.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
from typing import Any

import numpy as np
import torch

from mimo_builder._internal.data.collate import DataError

ALLOWED = "megatron.energon."


def encode(value: Any) -> Any:
    """JSON values for an energon state (raises DataError on a type it does not know)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [encode(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"ndarray": _array(value)}
    if isinstance(value, torch.Tensor):
        return {"tensor": _array(value.detach().cpu().numpy())}
    if dataclasses.is_dataclass(value) and type(value).__module__.startswith(ALLOWED):
        kind = type(value)
        return {"class": {"name": f"{kind.__module__}:{kind.__qualname__}",
                          "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}}
    if isinstance(value, dict):
        kind = type(value)
        named = None if kind is dict else f"{kind.__module__}:{kind.__qualname__}"
        if named is not None and not named.startswith(ALLOWED):
            raise DataError(f"data loader state: cannot save a {named}")
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()], "kind": named}
    raise DataError(f"data loader state: cannot save a value of type {type(value).__qualname__}")


def decode(data: Any) -> Any:
    """The state :func:`encode` wrote (DataError for anything it would not have written)."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not isinstance(data, dict) or len(data.keys() - {"kind"}) != 1:
        raise DataError(f"data loader state: unexpected entry {str(data)[:80]}")
    (tag,) = data.keys() - {"kind"}
    body = data[tag]
    if tag == "bytes":
        return base64.b64decode(body)
    if tag in ("list", "tuple"):
        items = [decode(v) for v in body]
        return items if tag == "list" else tuple(items)
    if tag == "ndarray":
        return _from_array(body)
    if tag == "tensor":
        return torch.from_numpy(_from_array(body))
    if tag == "dict":
        kind = _allowed(data["kind"]) if data.get("kind") else dict
        return kind((decode(k), decode(v)) for k, v in body)
    if tag == "class":
        return _dataclass(_allowed(body.get("name")), body.get("fields", {}))
    raise DataError(f"data loader state: unknown entry '{tag}'")


def _dataclass(kind: type, fields: dict) -> Any:
    if not dataclasses.is_dataclass(kind):
        raise DataError(f"data loader state: {kind.__qualname__} is not an energon state record")
    value = object.__new__(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    for name, field_value in fields.items():
        if name not in names:
            raise DataError(f"data loader state: {kind.__qualname__} has no field '{name}'")
        object.__setattr__(value, name, decode(field_value))
    return value


def _allowed(name: str) -> type:
    module, _, qualname = str(name).partition(":")
    if not module.startswith(ALLOWED) or not qualname or "." in qualname:
        raise DataError(f"data loader state: refusing to create '{name}' (only megatron.energon records)")
    found = getattr(importlib.import_module(module), qualname, None)
    if not isinstance(found, type):
        raise DataError(f"data loader state: '{name}' is not a class")
    return found


def _array(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


def _from_array(body: dict) -> np.ndarray:
    dtype = np.dtype(body["dtype"])
    if dtype.hasobject:
        raise DataError("data loader state: object arrays are refused")
    return np.frombuffer(base64.b64decode(body["data"]), dtype=dtype).reshape(body["shape"]).copy()
