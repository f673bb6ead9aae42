"""Which graphs MCore's MimoModel can express, decided before any process group exists.

A MimoModel is a star: modalities, each one encoder and at most one input projection, around one
language model that takes their embeddings at placeholder tokens. :func:`check_exportable`
reads that shape off a graph, asks each node's builder whether it can take its role
(:meth:`ModelBuilder.mimo_problems`), and checks the placements MIMO can run on. Every refusal
is a :class:`ConfigError` naming the node and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo_builder._internal.kinds.builder import token_input_ports
from mimo_builder._internal.platform.compat import resolve_device
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.validation import ValidGraph, validate_graph

LANGUAGE_INPUTS = frozenset(p.name for p in token_input_ports(1))
"""The language node's batch-bound ports MimoModel.forward takes as its own arguments."""


@dataclass(frozen=True)
class Modality:
    """One MIMO modality: the language node's input port it feeds, its encoder and projection."""

    name: str
    encoder: str
    projection: str | None


@dataclass(frozen=True)
class Star:
    """A graph's MIMO shape: the language node and its modalities."""

    language: str
    modalities: tuple[Modality, ...]

    def roles(self) -> dict[str, str]:
        """Node -> MIMO role ('encoder', 'projection', 'language')."""
        roles = {self.language: "language"}
        for m in self.modalities:
            roles[m.encoder] = "encoder"
            if m.projection is not None:
                roles[m.projection] = "projection"
        return roles

    def modality_of(self, node: str) -> Modality | None:
        """The modality whose encoder or projection ``node`` is; None for the language node or a node in none."""
        return next((m for m in self.modalities if node in (m.encoder, m.projection)), None)


def check_exportable(graph: Graph, world_size: int, device: str | torch.device = "auto") -> tuple[ValidGraph, Star]:
    """The validated graph and its star, or a ConfigError listing every reason MIMO cannot
    express it (shape, roles, placements on ``device``)."""
    valid = validate_graph(graph, world_size)
    star = star_shape(valid)
    roles = star.roles()
    problems = [f"node '{name}': {p}" for name in valid.order for p in valid.builders[name].mimo_problems(roles[name])]
    problems += placement_problems(valid, star, resolve_device(device))
    if problems:
        raise ConfigError("cannot export to MCore's MimoModel:\n" + "\n".join(f"  - {p}" for p in problems))
    return valid, star


def star_shape(valid: ValidGraph) -> Star:
    """The star of ``valid``: one language node (the only one feeding no other), each of its
    edge-fed ports a modality; raises ConfigError naming the node that breaks the shape."""
    feeds = {name: [e for e in valid.edges if e.src == name] for name in valid.order}
    fed_by = {name: [e for e in valid.edges if e.dst == name] for name in valid.order}
    sinks = [name for name in valid.order if not feeds[name]]
    if len(sinks) != 1:
        raise _refuse(sinks[1], f"nodes {sinks} all end the graph; a MimoModel has exactly one language model "
                                "that every other node feeds")
    language = sinks[0]
    for name, edges in feeds.items():
        if len(edges) > 1:
            raise _refuse(name, f"it feeds {len(edges)} ports ({', '.join(map(str, edges))}); in a MimoModel an "
                                "encoder or projection feeds exactly one modality")
    modalities = tuple(_modality(edge.dst_port, edge.src, fed_by) for edge in fed_by[language])
    _check_bindings(valid, language, modalities)
    return Star(language, modalities)


def _modality(port: str, src: str, fed_by) -> Modality:
    inputs = fed_by[src]
    if not inputs:
        return Modality(port, src, None)
    if len(inputs) > 1 or fed_by[inputs[0].src]:
        raise _refuse(src, "a MimoModel modality is an encoder and at most one projection before the language "
                           f"model; '{src}' is fed by {', '.join(map(str, inputs))}, which makes a longer chain "
                           "or a fan-in (a DAG MIMO cannot express)")
    return Modality(port, inputs[0].src, src)


def _check_bindings(valid: ValidGraph, language: str, modalities: tuple[Modality, ...]) -> None:
    projections = {m.projection for m in modalities}
    for key, (node, port) in valid.inputs.items():
        if node in projections:
            raise _refuse(node, f"batch key {key!r} feeds its port '{port}'; a MIMO projection takes only its "
                                "encoder's output")
        if node == language and port not in LANGUAGE_INPUTS:
            raise _refuse(node, f"batch key {key!r} feeds its port '{port}'; MimoModel.forward takes only "
                                f"{sorted(LANGUAGE_INPUTS)} for the language model, modality embeddings come "
                                "from encoders")
    for node, port in valid.outputs:
        if node != language:
            raise _refuse(node, f"the graph outputs '{node}.{port}'; a MimoModel returns only the language "
                                "model's output")
    for m in modalities:
        outputs = valid.ports(m.encoder).outputs
        if len(outputs) != 1:
            raise _refuse(m.encoder, f"it has output ports {sorted(outputs)}; a MIMO encoder returns one tensor")


def placement_problems(valid: ValidGraph, star: Star, device: torch.device) -> list[str]:
    """Why MIMO cannot run the nodes where the graph places them (empty when it can)."""
    layouts = valid.layouts
    problems = [f"node '{name}': pp {layout.pp} > 1; the exported MimoModel builds each node as one "
                "pipeline stage" for name, layout in layouts.items() if layout.pp > 1]
    for m in star.modalities:
        if m.projection is not None and layouts[m.projection] != layouts[m.encoder]:
            problems.append(f"node '{m.projection}': inside MIMO a projection shares its encoder's grid, but "
                            f"'{m.projection}' is placed {_where(layouts[m.projection])} and its encoder "
                            f"'{m.encoder}' {_where(layouts[m.encoder])}; give both the same placement")
    language = layouts[star.language]
    for m in star.modalities:
        encoder = layouts[m.encoder]
        if encoder == language:
            continue
        if encoder.ranks != language.ranks:
            problems.append(f"node '{m.encoder}': placed {_where(encoder)}, not on the language model's ranks "
                            f"({_where(language)}); MCore's non-colocated MIMO path runs only with NCCL "
                            "(BridgeCommunicator) and its multi-module pipeline schedule, so the export builds "
                            "the colocated layout: place every node on the language model's ranks")
        elif device.type != "cuda":
            problems.append(f"node '{m.encoder}': placed {_where(encoder)}, the language model {_where(language)}: "
                            "colocated nodes with different layouts need MCore's ColocatedBridgeCommunicator, "
                            f"which is NCCL-only; on {device.type} give every node the language model's layout")
    return problems


def _where(layout: Layout) -> str:
    last = layout.offset + layout.size - 1
    return f"on ranks {layout.offset}-{last} (tp {layout.tp}, dp {layout.dp}, pp {layout.pp}, cp {layout.cp})"


def _refuse(node: str, reason: str) -> ConfigError:
    return ConfigError(f"cannot export to MCore's MimoModel: node '{node}': {reason}")
