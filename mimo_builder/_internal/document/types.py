"""Value types of documents and how their validation errors read: strict numbers and booleans,
hook references, one line per invalid field.

Shared by the graph document (:mod:`mimo_builder._internal.document.graph`) and the node configs
(:mod:`mimo_builder._internal.kinds.config`); pure data, no name resolution.
"""

from __future__ import annotations

from typing import Annotated, Callable, Union

from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from mimo_builder._internal.document.options import closest
from mimo_builder._internal.errors import clip, excerpt

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
"""An int > 0 written as an int: booleans, floats and strings ("2") are refused, not converted."""

NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
"""An int >= 0 written as an int (strict like PositiveInt)."""

StrictInt = Annotated[int, Field(strict=True)]
"""Any int written as an int (strict like PositiveInt)."""

FiniteNonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A number >= 0 that is finite: ``.inf`` and ``.nan`` are refused (a learning rate of inf turns
every weight into NaN at the first step)."""

StrictBool = Annotated[bool, Field(strict=True)]
"""true or false written as such: "yes", 1 or "false" are refused, not converted."""

MAX_SHOWN_ERRORS = 20
"""A ConfigError from validation lists at most this many fields."""

HookRef = Annotated[
    Union[str, Callable],
    WithJsonSchema({"type": "string", "description": "registered hook name or 'module:function'"}),
]


def describe_errors(cls: type[BaseModel], err: ValidationError, where: str) -> str:
    """One line per invalid field (at most MAX_SHOWN_ERRORS), quoting only short excerpts of input."""
    lines = []
    errors = err.errors(include_url=False)
    for e in errors[:MAX_SHOWN_ERRORS]:
        loc = ".".join(clip(str(p), 40) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            lines.append(f"{where}.{loc}: unknown key {excerpt(key)} for {cls.__name__}"
                         f"{closest(key, cls.model_fields)}")
        elif e["type"] == "missing":
            lines.append(f"{where}.{loc}: required by {cls.__name__} but missing")
        elif e["type"] == "value_error":
            lines.append(f"{where}.{loc}: {clip(e['msg'].removeprefix('Value error, '), 300)}")
        else:
            lines.append(f"{where}.{loc}: {e['msg']} (got {excerpt(e.get('input'))})")
    if len(errors) > MAX_SHOWN_ERRORS:
        lines.append(f"{where}: ... and {len(errors) - MAX_SHOWN_ERRORS} more invalid fields")
    return "\n".join(lines)
