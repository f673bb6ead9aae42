"""What every picture shows, computed once: nodes with their layouts and port names, edges with
ports, feature sizes and tokens per sample, colours, and the placement as columns of ranks
(consecutive ranks merged in large worlds).

Pure data and arithmetic over a validated graph: no drawing library is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.planning.estimate import token_arrivals
from mimo_builder._internal.validation import ValidGraph, validate_graph

# matplotlib's tab20 pairs (dark edge, light fill): the same colour for a node in every picture.
PALETTE = (("#1f77b4", "#aec7e8"), ("#ff7f0e", "#ffbb78"), ("#2ca02c", "#98df8a"), ("#d62728", "#ff9896"),
           ("#9467bd", "#c5b0d5"), ("#8c564b", "#c49c94"), ("#e377c2", "#f7b6d2"), ("#7f7f7f", "#c7c7c7"),
           ("#bcbd22", "#dbdb8d"), ("#17becf", "#9edae5"))

PER_RANK_COLUMNS = 32
"""Up to this many ranks, the placement has one column per rank; above, consecutive ranks that
host the same nodes (at the same pipeline stage, then at all) share a column."""


@dataclass(frozen=True)
class NodeView:
    """One node as drawn: name, builder, ranks and split, frozen, colours, and the names of the
    builder's input and output ports (connected or not)."""

    name: str
    builder: str
    layout: Layout
    frozen: bool
    edge_colour: str
    fill_colour: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def ranks_text(self) -> str:
        """The node's ranks as ranges, e.g. '0-63' or '3'."""
        return span_text(self.layout.ranks)

    @property
    def ranks_label(self) -> str:
        """'rank 3' or 'ranks 0-63'."""
        return f"rank{'s' if self.layout.size > 1 else ''} {self.ranks_text}"

    @property
    def split_text(self) -> str:
        """'tp2 cp1 pp1 dp1 ep1' (and etp when it differs from tp)."""
        lay = self.layout
        etp = f" etp{lay.expert_tp}" if lay.expert_tp != lay.tp else ""
        return f"tp{lay.tp} cp{lay.cp} pp{lay.pp} dp{lay.dp} ep{lay.ep}{etp}"

    def detail_lines(self) -> list[str]:
        """The lines under the name: builder and ranks, the split, 'frozen'."""
        lines = [f"{self.builder} · {self.ranks_label}", self.split_text]
        return lines + ["frozen"] if self.frozen else lines

    def port_lines(self) -> list[str]:
        """'in: a, b' and 'out: c', each line only where the builder has such ports."""
        return [f"{side}: {', '.join(names)}" for side, names in (("in", self.inputs), ("out", self.outputs))
                if names]

    def box_lines(self) -> list[str]:
        """Everything under the name in a text box: the details, then the ports."""
        return self.detail_lines() + self.port_lines()


@dataclass(frozen=True)
class EdgeView:
    """One edge: ports at both ends, the feature size carried and the tokens per sample (each
    None where it varies or is not known)."""

    src: str
    src_port: str
    dst: str
    dst_port: str
    features: int | None
    tokens: int | None = None

    @property
    def label(self) -> str:
        """'src_port → dst_port (17 tokens × 64)': tokens per sample × features, each left out
        where it is not known."""
        sizes = ([plural(self.tokens, "token")] if self.tokens is not None else []) + \
            ([str(self.features)] if self.features is not None else [])
        return f"{self.src_port} → {self.dst_port}" + (f" ({' × '.join(sizes)})" if sizes else "")


@dataclass(frozen=True)
class Column:
    """Consecutive ranks ``first..last`` drawn as one column; per hosted node, the coordinates
    (tp, cp when split, dp, pp) those ranks have in it, as text ('0', '0-7', '0-1, 3')."""

    first: int
    last: int
    cells: dict[str, dict[str, str]]

    @property
    def title(self) -> str:
        """'3' for one rank, '0-7' for several."""
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Scene:
    """A validated graph ready to draw on a world of ``world_size`` ranks."""

    nodes: list[NodeView]
    edges: list[EdgeView]
    world_size: int
    world_note: str
    """How the world size was chosen, e.g. '--world-size 8' or 'the ranks the placements name'."""

    @property
    def world_text(self) -> str:
        """'world: 4 ranks (the ranks the placements name)'."""
        return f"world: {plural(self.world_size, 'rank')} ({self.world_note})"

    def colocated_groups(self) -> list[list[NodeView]]:
        """Nodes on exactly the same ranks, in groups of two or more, in graph order."""
        groups: dict[tuple[int, int], list[NodeView]] = {}
        for node in self.nodes:
            groups.setdefault((node.layout.offset, node.layout.size), []).append(node)
        return [group for group in groups.values() if len(group) > 1]


def build_scene(graph: Graph, world_size: int | None = None) -> Scene:
    """Validate ``graph`` (for ``world_size`` ranks, else the smallest world its placements
    need) and collect what the pictures show. Raises the validation's named errors."""
    if world_size is None:
        world_size, note = smallest_world(graph)
    else:
        note = f"--world-size {world_size}"
    valid = validate_graph(graph, world_size)
    nodes = [_node_view(valid, name, i) for i, name in enumerate(valid.order)]
    arrivals = token_arrivals(valid)
    return Scene(nodes, [_edge_view(valid, e, arrivals) for e in valid.edges], world_size, note)


def _node_view(valid: ValidGraph, name: str, index: int) -> NodeView:
    node, ports = valid.graph.nodes[name], valid.ports(name)
    return NodeView(name, node.builder, valid.layouts[name], node.frozen, *PALETTE[index % len(PALETTE)],
                    tuple(ports.inputs), tuple(ports.outputs))


def _edge_view(valid: ValidGraph, edge, arrivals: dict[str, dict[str, int]]) -> EdgeView:
    """The edge with its feature size and the tokens per sample arriving on its input port."""
    out = valid.ports(edge.src).outputs[edge.src_port].features
    inp = valid.ports(edge.dst).inputs[edge.dst_port].features
    return EdgeView(edge.src, edge.src_port, edge.dst, edge.dst_port, out if out is not None else inp,
                    arrivals[edge.dst].get(edge.dst_port))


def smallest_world(graph: Graph) -> tuple[int, str]:
    """The fewest ranks every placement fits: the last rank a placement names when all give a
    size; a node without a size (all ranks from its offset on) needs a multiple of its split."""
    placements = {name: node.placement for name, node in graph.nodes.items()}
    open_ended = {name: _size_step(p) for name, p in placements.items() if p.size is None}
    ends = [p.offset + (p.size if p.size is not None else open_ended[name]) for name, p in placements.items()]
    low = max(ends, default=1)
    if not open_ended:
        return low, "the ranks the placements name"
    period = math.lcm(*open_ended.values())
    for world in range(low, low + period):
        if all((world - placements[name].offset) % step == 0 for name, step in open_ended.items()):
            return world, "the smallest world the placements need; --world-size N to choose"
    needs = ", ".join(f"'{name}' (offset {placements[name].offset}, a multiple of {step} ranks)"
                      for name, step in open_ended.items())
    raise ConfigError(f"no world size fits the placements without a size of nodes {needs}; "
                      "give those placements a size, or pass --world-size N")


def _size_step(placement: Placement) -> int:
    """What an open-ended node's rank count must be a multiple of: its model and expert splits."""
    lay = placement.layout(placement.offset + 1)
    return math.lcm(lay.tp * lay.cp * lay.pp, lay.expert_tp * lay.ep * lay.pp)


def rank_columns(scene: Scene) -> list[Column]:
    """The placement's columns: one per rank in small worlds; in large ones, consecutive ranks
    hosting the same nodes at the same pipeline stages, or (if still too many) the same nodes."""
    hosted = [[(n, n.layout.coords(rank)) for n in scene.nodes if rank in n.layout.ranks]
              for rank in range(scene.world_size)]
    if scene.world_size <= PER_RANK_COLUMNS:
        return [_column(rank, rank, hosted[rank:rank + 1]) for rank in range(scene.world_size)]
    runs = _runs(hosted, lambda h: tuple((n.name, c["pp"]) for n, c in h))
    if len(runs) > PER_RANK_COLUMNS:
        runs = _runs(hosted, lambda h: tuple(n.name for n, _ in h))
    return [_column(first, last, hosted[first:last + 1]) for first, last in runs]


def _runs(hosted, key) -> list[tuple[int, int]]:
    runs: list[list] = []
    for rank, here in enumerate(hosted):
        if runs and runs[-1][2] == key(here):
            runs[-1][1] = rank
        else:
            runs.append([rank, rank, key(here)])
    return [(first, last) for first, last, _ in runs]


def _column(first: int, last: int, hosted) -> Column:
    values: dict[str, dict[str, set[int]]] = {}
    split: dict[str, Layout] = {}
    for here in hosted:
        for node, coords in here:
            split[node.name] = node.layout
            for dim, value in coords.items():
                values.setdefault(node.name, {}).setdefault(dim, set()).add(value)
    cells = {name: {dim: span_text(sorted(vals)) for dim, vals in dims.items()
                    if dim != "cp" or split[name].cp > 1}
             for name, dims in values.items()}
    return Column(first, last, cells)


def plural(count: int, noun: str) -> str:
    """'1 rank', '1,024 ranks'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def span_text(values) -> str:
    """Sorted integers as ranges: [0, 1, 2, 5] -> '0-2, 5'."""
    values = list(values)
    parts, start = [], None
    for i, value in enumerate(values):
        start = value if start is None else start
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)
