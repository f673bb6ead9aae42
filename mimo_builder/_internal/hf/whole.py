"""Whole Hugging Face models (LLaVA, ...) as graphs: ``import-hf DIR`` and ``export --as FORMAT``.

A :class:`WholeModelFormat` says how one Hugging Face model type is a graph: the graph document
a folder of it makes (its nodes read the folder through ``init: {hf: DIR}``: each node's own
mapping finds its tensors there), where each node's exported tensors go in the one folder of
the whole model (a :class:`~mimo_builder._internal.hf.mapping.Nesting` per node), and its
config.json. Formats are installed as entry points (group ``mimo_builder.hf_formats``), as
node kinds are: this package knows none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.hf import files
from mimo_builder._internal.hf.mapping import Nesting

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""A folder holding any of these holds a Hugging Face tokenizer."""
FORMAT_GROUP = "mimo_builder.hf_formats"
"""Entry-point group of whole-model formats (name -> ``module:OBJECT``)."""


@dataclass(frozen=True)
class WholeModelFormat:
    """How a Hugging Face whole-model type maps to a graph, both ways."""

    name: str
    """The name ``export --as`` takes (e.g. ``llava``)."""

    model_types: tuple[str, ...]
    """config.json ``model_type`` values that ``import-hf`` reads with this format."""

    graph_from: Callable[[str, dict], dict]
    """(folder, its config.json) -> the graph document (a dict) whose nodes read the folder;
    raises ConfigError naming the config field it cannot honour."""

    nestings: Callable[[Any], dict[str, Nesting]]
    """(a Graph) -> node -> where its exported tensors go in the whole folder; raises ConfigError
    naming the node (and why) when the graph cannot be written in this format."""

    config: Callable[[Any, dict[str, dict]], dict]
    """(the Graph, node -> that node's exported config.json) -> the whole model's config.json."""


def formats() -> dict[str, WholeModelFormat]:
    """Every installed whole-model format by name."""
    from mimo_builder._internal.kinds.registry import active_registry

    registry = active_registry()
    points, _ = registry.installed(FORMAT_GROUP)
    found = {name: registry.import_reference(point.value, f"{FORMAT_GROUP} {name!r}") for name, point in points.items()}
    return {name: fmt for name, fmt in sorted(found.items()) if isinstance(fmt, WholeModelFormat)}


def format_named(name: str) -> WholeModelFormat:
    """The format ``name`` (``export --as``); a ConfigError listing the installed ones."""
    known = formats()
    if name not in known:
        raise ConfigError(f"--as {name!r}: no such whole-model format; installed: {sorted(known)}")
    return known[name]


def tokenizer_entry(folder: str) -> dict:
    """The graph document's ``tokenizer`` entry for a model folder: ``{"tokenizer": {"hf": folder}}``
    when the folder holds a tokenizer, else nothing."""
    if any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return {"tokenizer": {"hf": folder}}
    return {}


def read_config(folder: str | Path) -> dict:
    """``folder``'s config.json; a ConfigError when the folder or the file is missing or unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"import-hf: {folder} holds no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"import-hf: {path} is not readable JSON: {err}") from err


def format_of_folder(folder: str | Path) -> tuple[WholeModelFormat, dict]:
    """The format that reads ``folder`` and its config.json; a ConfigError naming the model type
    and the ones supported."""
    config = read_config(folder)
    model_type = config.get("model_type")
    known = formats()
    for fmt in known.values():
        if model_type in fmt.model_types:
            return fmt, config
    supported = sorted(t for fmt in known.values() for t in fmt.model_types)
    raise ConfigError(f"import-hf: {folder}: config.json model_type {model_type!r} cannot be imported; "
                      f"supported: {supported}")


def graph_of_folder(folder: str | Path):
    """The graph a whole-model folder makes (validated as a document; its nodes read ``folder``)."""
    from mimo_builder._internal.document.graph import Graph

    fmt, config = format_of_folder(folder)
    return Graph.model_validate(fmt.graph_from(str(Path(folder).resolve()), config))


def compose(fmt: WholeModelFormat, graph, parts: dict[str, Path], out: str | Path) -> Path:
    """Write the whole model to ``out`` from each node's exported folder (``parts``): every
    tensor renamed by its node's nesting, one safetensors file, the format's config.json."""
    nestings, tensors, configs = fmt.nestings(graph), {}, {}
    for node, folder in parts.items():
        configs[node] = files.read_config(folder)
        names = list(files.tensor_shapes(folder))
        for name, tensor in files.read_tensors(folder, names).items():
            tensors[nestings[node].folder_name(name)] = tensor
    return files.write(out, tensors, fmt.config(graph, configs))
