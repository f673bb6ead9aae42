"""From names to objects above the document: a graph from a file or a ``module:attr`` reference,
and a node's validated config from its builder's name.

The document model (:mod:`mimo_builder._internal.document`) is data and never resolves a name; the
registry (:mod:`mimo_builder._internal.kinds.registry`) turns names into classes; this module joins them.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from mimo_builder._internal.document.files import load_file
from mimo_builder._internal.document.graph import DOCUMENT_SUFFIXES, Graph, Node
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.kinds.registry import active_registry, describe_object


def load_graph(source: str) -> Graph:
    """A graph from a YAML/JSON file path (JSON for ``.json``; a regular file of at most 1 MiB),
    or from ``module:attr`` naming a Graph (or a function returning one) under the allowed
    module prefixes."""
    if source.endswith(DOCUMENT_SUFFIXES) or os.path.lexists(source):
        return Graph.from_dict(load_file(source, what="graph file"), where=source)
    return resolve_graph(source, where="graph")


def resolve_graph(ref: str, where: str = "graph") -> Graph:
    """The Graph named by ``module:attr``: a Graph, or a function called without arguments
    that returns one (both defined under an allowed prefix of the active registry)."""
    obj = active_registry().import_reference(ref, where)
    if isinstance(obj, Graph):
        return obj
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        raise ConfigError(f"{where}: {ref!r} is {describe_object(obj)}, not a mimo_builder._internal.document.graph.Graph "
                          "or a function returning one")
    signature = inspect.signature(obj)
    if not _may_return(signature.return_annotation, Graph):
        raise ConfigError(f"{where}: {ref!r} is annotated to return "
                          f"{inspect.formatannotation(signature.return_annotation)}, "
                          "not a mimo_builder._internal.document.graph.Graph; it was not called")
    try:
        signature.bind()
    except TypeError as err:
        raise ConfigError(f"{where}: {ref!r} must be callable without arguments to return a Graph: {err}") from err
    graph = obj()
    if not isinstance(graph, Graph):
        raise ConfigError(f"{where}: {ref!r} returned {describe_object(graph)}, not a mimo_builder._internal.document.graph.Graph")
    return graph


def node_config(node: Node, where: str) -> ModelConfig:
    """The validated ModelConfig a graph node describes (raises ConfigError)."""
    if "builder" in node.config:
        raise ConfigError(f"{where}.builder: the builder is named beside 'config' (node 'builder: ...'), "
                          "not inside it; remove config.builder")
    return ModelConfig.from_dict({**node.config, "builder": node.builder}, where=where)


def _may_return(annotation: Any, cls: type) -> bool:
    """False when a return annotation rules out ``cls`` (a string annotation is matched by name)."""
    if annotation is inspect.Signature.empty:
        return True
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1] == cls.__name__
    return isinstance(annotation, type) and issubclass(annotation, cls)
