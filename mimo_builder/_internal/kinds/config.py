"""ModelConfig: the serializable description of one node's model, as a pydantic v2 model.

A config names its builder (``builder``: a registered short name or an allowlisted
``module:Class``); the builder's ``config_class`` tells which config class validates the rest,
so a plain dict rebuilds the right subclass. Unknown keys are errors naming the key, the class
and the closest valid names. Documents round-trip losslessly through dicts, JSON and YAML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from mimo_builder._internal.document.files import parse_json, parse_yaml
from mimo_builder._internal.document.types import (  # noqa: F401 (the value types are public here too)
    MAX_SHOWN_ERRORS, HookRef, NonNegativeInt, PositiveInt, StrictBool, StrictInt, describe_errors)
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.registry import reference_of, resolve_builder, resolve_hook

class ModelConfig(BaseModel):
    """Base of every node config. Pure data: construction lives in the matching ModelBuilder."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        protected_namespaces=(),
    )

    builder: str
    """Registered builder name (e.g. 'mamba') or 'module:Class' under the allowlist."""

    pre_wrap_hooks: list[HookRef] = Field(default_factory=list)
    """Run in order on the list of model chunks before mixed-precision and DDP wrapping."""

    post_wrap_hooks: list[HookRef] = Field(default_factory=list)
    """Run in order on the list of wrapped model chunks after wrapping."""

    @field_serializer("pre_wrap_hooks", "post_wrap_hooks")
    def _hooks_as_names(self, hooks: list) -> list[str]:
        return [hook if isinstance(hook, str) else _hook_reference(hook) for hook in hooks]

    # --- construction from data -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> "ModelConfig":
        """Build the config subclass that ``data['builder']`` names, validating every key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
        ref = data.get("builder", _default_builder(cls))
        where = where or "config"
        if ref is None:
            raise ConfigError(f"{where}: missing 'builder' (a registered name or 'module:Class')")
        config_cls = resolve_builder(ref, where=f"{where}.builder").config_class
        if not issubclass(config_cls, cls):
            raise ConfigError(f"{where}: builder {ref!r} takes {config_cls.__name__}, not a {cls.__name__}")
        return config_cls.validated({**data, "builder": ref}, where)

    @classmethod
    def validated(cls, data: Mapping[str, Any], where: str | None = None) -> "ModelConfig":
        """``model_validate`` with errors turned into one ConfigError naming every bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(describe_errors(cls, err, where or cls.__name__)) from None

    @classmethod
    def from_json(cls, text: str, where: str | None = None) -> "ModelConfig":
        """The config a JSON text describes (as :meth:`from_dict`)."""
        return cls.from_dict(parse_json(text, where or "config"), where)

    @classmethod
    def from_yaml(cls, text: str, where: str | None = None) -> "ModelConfig":
        """Parse with safe YAML only (:func:`mimo_builder._internal.document.files.parse_yaml`): YAML tags cannot
        construct Python objects, duplicate keys and alias bombs are refused."""
        return cls.from_dict(parse_yaml(text, where or "config"), where)

    # --- serialization ----------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict; ``from_dict`` on it returns an equal config."""
        for hook in [*self.pre_wrap_hooks, *self.post_wrap_hooks]:
            if not isinstance(hook, str):
                _hook_reference(hook)  # raises a ConfigError for hooks a document cannot name
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        """The config as JSON (:meth:`as_dict`)."""
        return json.dumps(self.as_dict(), indent=indent)

    def to_yaml(self) -> str:
        """The config as YAML (:meth:`as_dict`)."""
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of this config class."""
        return cls.model_json_schema()

    # --- builder and hooks ------------------------------------------------------------------

    def builder_class(self) -> type:
        """The builder class ``builder`` names, resolved through the active registry."""
        return resolve_builder(self.builder, where=f"{type(self).__name__}.builder")

    def has_experts(self) -> bool:
        """Whether the model has expert (MoE) layers, the only ones placement.ep/etp split."""
        return False

    def make_builder(self):
        """A builder of the class this config names, holding this config."""
        return self.builder_class()(self)

    def with_token_ids(self, lookup) -> "ModelConfig":
        """This config with every token it names by text (e.g. ``"<image>"``) replaced by its id,
        ``lookup(name) -> id`` (the graph's tokenizer); the default names none."""
        return self

    def resolved_hooks(self, which: str) -> list[Callable]:
        """``pre_wrap_hooks`` or ``post_wrap_hooks`` as callables, in declared order."""
        return [resolve_hook(h, where=f"{type(self).__name__}.{which}[{i}]")
                for i, h in enumerate(getattr(self, which))]


def _default_builder(cls: type[ModelConfig]) -> str | None:
    default = cls.model_fields["builder"].default
    return default if isinstance(default, str) else None


def _hook_reference(hook: Callable) -> str:
    ref = reference_of(hook)
    if getattr(hook, "__mimo_name__", None) is None and "<" in ref:
        raise ConfigError(
            f"hook {ref} is not serializable: register it with @mimo_builder._internal.kinds.registry.register_hook('name') "
            "or define it at module level under an allowed prefix"
        )
    return ref
