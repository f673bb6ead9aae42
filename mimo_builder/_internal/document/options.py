"""Validate option dicts passed through to MCore dataclasses (TransformerConfig, DDP config).

Documents carry MCore options as plain dicts so they stay serializable. Each key is checked
against the dataclass's fields (an unknown key names the closest valid ones) and each value
against the field's type where pydantic can express that type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, TypeAdapter, ValidationError

TRANSFORMER_CONFIG = "megatron.core.transformer:TransformerConfig"
DDP_CONFIG = "megatron.core.distributed:DistributedDataParallelConfig"
OPTIMIZER_CONFIG = "megatron.core.optimizer:OptimizerConfig"


def closest(name: str, candidates, n: int = 3) -> str:
    """'did you mean ...' text for ``name`` among ``candidates`` (empty when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


def check_options(dataclass_type: type | str, options: dict[str, Any]) -> dict[str, Any]:
    """Return ``options`` if every key is a field of ``dataclass_type`` (a class, or its
    ``module:Name``, imported on first use) with a value of its type.

    Raises ValueError naming the first bad key; pydantic adds the location it was found at.
    """
    dataclass_type = mcore_dataclass(dataclass_type)
    if not isinstance(options, dict):
        raise ValueError(f"expected a mapping of {dataclass_type.__name__} options, got {type(options).__name__}")
    fields = _init_fields(dataclass_type)
    for key, value in options.items():
        if key not in fields:
            raise ValueError(
                f"unknown {dataclass_type.__name__} option {key!r}{closest(key, fields)}"
            )
        adapter = _adapter(dataclass_type, key)
        if adapter is not None:
            try:
                adapter.validate_python(value, strict=False)
            except ValidationError as err:
                expected = _type_hints(dataclass_type)[key]
                raise ValueError(
                    f"{dataclass_type.__name__} option {key!r}={value!r} is not a valid {_type_name(expected)}: "
                    f"{err.errors()[0]['msg']}"
                ) from None
    return options


def options_type(dataclass_type: type | str):
    """A pydantic field type: a dict of options checked against ``dataclass_type`` (a class, or its
    ``module:Name``: a document model that names MCore's dataclasses this way imports MCore only
    when it validates options, so ``mimo-builder schema`` stays light)."""
    return Annotated[dict[str, Any], AfterValidator(functools.partial(check_options, dataclass_type))]


@functools.cache
def mcore_dataclass(ref: type | str) -> type:
    """The dataclass ``ref`` names (``module:Name``), imported once; a class is returned as is."""
    if isinstance(ref, type):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


TransformerOptions = options_type(TRANSFORMER_CONFIG)
DDPOptions = options_type(DDP_CONFIG)


@functools.cache
def _init_fields(dataclass_type: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(dataclass_type) if f.init)


@functools.cache
def _type_hints(dataclass_type: type) -> types.MappingProxyType:
    """The dataclass's field types, read-only: the cache hands the same object to every caller."""
    return types.MappingProxyType(typing.get_type_hints(dataclass_type))


@functools.cache
def _adapter(dataclass_type: type, key: str) -> TypeAdapter | None:
    """A validator for the field's type, or None when pydantic cannot express it (callables...)."""
    try:
        return TypeAdapter(_type_hints(dataclass_type)[key])
    except Exception:
        return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
