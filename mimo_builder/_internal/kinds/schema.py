"""JSON Schemas of graph documents and node configs, generated from the pydantic models.

In the graph schema each node's ``config`` is checked against its builder's config class: one
``if``/``then`` per registered builder name, keyed on the node's ``builder`` const (a union
discriminated by ``builder``). ``module:Class`` builders cannot be enumerated; their configs stay
open objects. Editors that read JSON Schema complete and check graph YAML with it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.kinds.registry import BUILDER_GROUP, CONFIG_GROUP, Registry, active_registry

REFERENCE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
"""A ``module:Class`` builder reference."""


def config_class_of(name: str, registry: Registry, where: str) -> type[ModelConfig]:
    """The config class of the kind ``name``: from the ``mimo_builder.configs`` entry point of an
    installed kind (its config module alone: no torch, no MCore), else from its builder."""
    if name not in registry.registered[BUILDER_GROUP]:
        points, _ = registry.installed(CONFIG_GROUP)
        if name in points:
            config = points[name].load()
            if not (isinstance(config, type) and issubclass(config, ModelConfig)):
                raise ConfigError(f"{where}: entry point {name!r} of {CONFIG_GROUP} is not a ModelConfig subclass")
            return config
    return registry.resolve_builder(name, where=where).config_class


def builder_schema(name: str, registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of one builder's config (raises ConfigError naming the known builders)."""
    registry = registry or active_registry()
    where = "--builder" if registry.audience == "cli" else "builder_schema(name)"
    return config_class_of(name, registry, where).model_json_schema()


def graph_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The graph document's JSON Schema, every registered kind's config checked by ``builder``."""
    registry = registry or active_registry()
    kinds = {name: config_class_of(name, registry, f"builder {name!r}") for name in registry.names(BUILDER_GROUP)}
    models = [Graph, *dict.fromkeys(kinds.values())]
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    defs = top["$defs"]
    schema = defs.pop(_def_name(refs, Graph))
    node_configs = {}
    for cls in dict.fromkeys(kinds.values()):
        key = _def_name(refs, cls)
        node_configs[cls] = key
        defs[key] = _without_builder(defs[key])
    _discriminate(defs["Node"], {name: node_configs[cls] for name, cls in kinds.items()})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "$defs": defs}


def _def_name(refs: dict, model: type) -> str:
    return refs[(model, "validation")]["$ref"].rsplit("/", 1)[-1]


def _without_builder(config_schema: dict[str, Any]) -> dict[str, Any]:
    """A config's schema as a node's ``config`` holds it: the builder is named beside it."""
    properties = {k: v for k, v in config_schema.get("properties", {}).items() if k != "builder"}
    required = [k for k in config_schema.get("required", []) if k != "builder"]
    out = {**config_schema, "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    else:
        out.pop("required", None)
    return out


def _discriminate(node: dict[str, Any], config_defs: dict[str, str]) -> None:
    """``node.config`` checked against the config of the builder ``node.builder`` names."""
    builder = node["properties"]["builder"]
    builder["anyOf"] = [{"enum": sorted(config_defs)}, {"type": "string", "pattern": REFERENCE_PATTERN}]
    builder.pop("type", None)
    node["allOf"] = [
        {"if": {"properties": {"builder": {"const": name}}, "required": ["builder"]},
         "then": {"properties": {"config": {"$ref": f"#/$defs/{key}"}}}}
        for name, key in sorted(config_defs.items())
    ]
