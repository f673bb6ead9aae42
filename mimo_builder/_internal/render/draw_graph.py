"""The graph panel: nodes in layers from left to right (each node right of everything it
reads), a box per node (name, builder, ranks, split, then its input and output ports), an arrow
per connected pair of nodes labelled with every edge between them (ports, tokens per sample and
feature size), and a dashed rounded frame, labelled with the ranks, behind nodes on the same ranks.

An arrow that skips layers runs through a free slot of each layer it crosses (a waypoint, as
in Sugiyama's layered drawing), so it never crosses a box; its label sits in the first gap.
Colocated nodes sit next to each other in each layer; a group whose one frame would take in
another node's box (or another group's frame) gets a frame per layer instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from mimo_builder._internal.render.clusters import CLUSTER_PAD, cluster_head, draw_clusters, keep_together
from mimo_builder._internal.render.sheet import PAD, Panel, Sheet, titled
from mimo_builder._internal.render.scene import NodeView, Scene, plural

NAME_FONT = {"fontsize": 10, "fontweight": "bold"}
DETAIL_FONT = {"fontsize": 8}
PORT_FONT = {"fontsize": 7, "color": "#333333"}
EDGE_FONT = {"fontsize": 7.5, "color": "#333333"}
BOX_PAD = 0.12  # inches between a box's border and its text
ROW_GAP = 0.35  # inches between slots of one layer
ARROW_ROOM = 0.5  # inches of bare arrow beside an edge label
WAYPOINT = 0.15  # inches: the height a passing arrow takes in a layer
LINE = {"color": "#555555", "linewidth": 1.1}


@dataclass
class _Slot:
    """A node's box, or a waypoint (``node`` None) of an arrow crossing a layer."""

    node: NodeView | None
    width: float
    height: float
    y: float = 0.0  # centre, down from the panel's top


@dataclass
class _Layout:
    layers: list[list[str]]  # slot keys per layer, top to bottom
    routes: dict[tuple[str, str], list[str]]  # waypoints of each arrow that skips layers
    columns: list[tuple[float, float]]  # left and right edge of each layer, from the panel's left
    layer_of: dict[str, int]


def graph_panel(scene: Scene, sheet: Sheet, with_world: bool = True) -> Panel:
    """The graph of ``scene``, titled (with the world size unless the placement says it), sized to its content."""
    slots = {n.name: _box(sheet, n) for n in scene.nodes}
    labels = _pair_labels(scene)
    groups = scene.colocated_groups()
    layout = _arrange(scene, slots, labels)
    label_widths = {pair: sheet.measure(text, **EDGE_FONT)[0] for pair, text in labels.items()}
    layout.columns = _columns(layout, slots, label_widths)
    head = cluster_head(sheet, groups)  # room above a frame's boxes for its label
    inset = CLUSTER_PAD if groups else 0.0  # room around the frames at the panel's edges
    group_of = {node.name: i for i, group in enumerate(groups) for node in group}

    def gap(upper: str, lower: str) -> float:  # room for a frame's foot and the next frame's head
        apart = group_of.get(upper, -1) != group_of.get(lower, -1)
        return ROW_GAP + (head + 2 * CLUSTER_PAD if apart else 0.0)

    height = _place_rows(layout.layers, slots, gap)

    def draw_body(left: float, top: float) -> None:
        left, top = left + inset, top - head - inset
        boxes = {}
        for k, layer in enumerate(layout.layers):
            centre = left + sum(layout.columns[k]) / 2
            for key in layer:
                if slots[key].node is not None:
                    boxes[key] = _draw_box(sheet, slots[key], centre, top - slots[key].y)
        draw_clusters(sheet, groups, boxes, layout.layer_of, head)
        for pair, text in labels.items():
            _draw_arrow(sheet, _path(pair, layout, slots, left, top), text)

    title = f"Graph: {plural(len(scene.nodes), 'node')}, {plural(len(scene.edges), 'edge')}"
    note = ("boxes: node, builder, ranks, split (tp cp pp dp ep), input and output ports\n"
            "arrows: output port → input port (tokens per sample × features); dashed frames: nodes on the same ranks")
    return titled(sheet, title, f"{note}\n{scene.world_text}" if with_world else note,
                  Panel(layout.columns[-1][1] + 2 * inset, height + head + 2 * inset, draw_body))


def _box(sheet: Sheet, node: NodeView) -> _Slot:
    name_w, name_h = sheet.measure(node.name, **NAME_FONT)
    detail_w, detail_h = sheet.measure(_details(node), **DETAIL_FONT)
    port_w, port_h = sheet.measure(_ports(node), **PORT_FONT) if node.port_lines() else (0.0, -PAD)
    return _Slot(node, max(name_w, detail_w, port_w) + 2 * BOX_PAD,
                 name_h + detail_h + port_h + 2 * BOX_PAD + 3 * PAD / 2)


def _details(node: NodeView) -> str:
    return "\n".join(node.detail_lines())


def _ports(node: NodeView) -> str:
    return "\n".join(node.port_lines())


def _pair_labels(scene: Scene) -> dict[tuple[str, str], str]:
    """One label per connected (source, destination) pair: its edges, one per line."""
    labels: dict[tuple[str, str], list[str]] = {}
    for edge in scene.edges:
        labels.setdefault((edge.src, edge.dst), []).append(edge.label)
    return {pair: "\n".join(lines) for pair, lines in labels.items()}


def _arrange(scene: Scene, slots: dict[str, _Slot], pairs) -> _Layout:
    """Layers of slots: topological generations plus a waypoint per layer an arrow skips; in
    each layer, slots ordered by where their inputs sit (fewer crossings)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(n.name for n in scene.nodes)
    dag.add_edges_from(pairs)
    generations = [list(g) for g in nx.topological_generations(dag)]
    layer_of = {name: k for k, g in enumerate(generations) for name in g}
    order = {n.name: i for i, n in enumerate(scene.nodes)}
    feeds: dict[str, list[str]] = {name: [] for name in layer_of}
    routes = {}
    for src, dst in pairs:
        previous = src
        for k in range(layer_of[src] + 1, layer_of[dst]):
            key = f"{src}>{dst}@{k}"  # not a node name: those have no '>'
            generations[k].append(key)
            layer_of[key], order[key], feeds[key] = k, order[src], [previous]
            slots[key] = _Slot(None, 0.0, WAYPOINT)
            routes.setdefault((src, dst), []).append(key)
            previous = key
        feeds[dst].append(previous)
    group_of = {node.name: i for i, group in enumerate(scene.colocated_groups()) for node in group}
    position: dict[str, float] = {}
    layers = []
    for generation in generations:
        def key(name):
            above = [position[p] for p in feeds[name]]
            return (sum(above) / len(above) if above else order[name], order[name])
        layer = keep_together(sorted(generation, key=key), group_of)
        position.update((name, float(i)) for i, name in enumerate(layer))
        layers.append(layer)
    return _Layout(layers, routes, [], layer_of)


def _columns(layout: _Layout, slots, label_widths) -> list[tuple[float, float]]:
    """Left and right edge of each layer; the gap after a layer fits the widest label leaving it."""
    columns, x = [], 0.0
    for k, layer in enumerate(layout.layers):
        width = max(slots[key].width for key in layer)
        columns.append((x, x + width))
        leaving = [w for (src, _), w in label_widths.items() if layout.layer_of[src] == k]
        x += width + max(leaving, default=0.0) + 2 * ARROW_ROOM
    return columns


def _place_rows(layers, slots, gap) -> float:
    """Set each slot's y (centre, down from the top), ``gap(upper, lower)`` inches between
    neighbours; every layer centred on the tallest."""
    stacks = [sum(slots[key].height for key in layer) + sum(map(gap, layer, layer[1:])) for layer in layers]
    height = max(stacks)
    for layer, stack in zip(layers, stacks):
        y = (height - stack) / 2
        for key, below in zip(layer, layer[1:] + [None]):
            slots[key].y = y + slots[key].height / 2
            y += slots[key].height + (gap(key, below) if below is not None else 0.0)
    return height


def _path(pair, layout: _Layout, slots, left: float, top: float) -> list[tuple[float, float]]:
    """From the source box's right edge, across each skipped layer at its waypoint, to the
    destination box's left edge."""
    src, dst = pair
    points = [(left + layout.columns[layout.layer_of[src]][1], top - slots[src].y)]
    for key in layout.routes.get(pair, []):
        column = layout.columns[layout.layer_of[key]]
        points += [(left + column[0], top - slots[key].y), (left + column[1], top - slots[key].y)]
    return points + [(left + layout.columns[layout.layer_of[dst]][0], top - slots[dst].y)]


def _draw_box(sheet: Sheet, slot: _Slot, cx: float, cy: float) -> tuple[float, float, float, float]:
    """The node's box centred at (cx, cy): name, details, and under a thin rule its ports. Returns
    the box's left, bottom, right and top."""
    node, top = slot.node, cy + slot.height / 2
    left, right = cx - slot.width / 2, cx + slot.width / 2
    sheet.box(left, cy - slot.height / 2, slot.width, slot.height, fill=node.fill_colour,
              edge=node.edge_colour, dashed=node.frozen, rounded=True)
    name_h = sheet.measure(node.name, **NAME_FONT)[1]
    sheet.text(cx, top - BOX_PAD, node.name, ha="center", va="top", zorder=3, **NAME_FONT)
    y = top - BOX_PAD - name_h - PAD / 2
    sheet.text(cx, y, _details(node), ha="center", va="top", multialignment="center", zorder=3, **DETAIL_FONT)
    if node.port_lines():
        y -= sheet.measure(_details(node), **DETAIL_FONT)[1] + PAD / 2
        sheet.ax.plot((left, right), (y, y), color=node.edge_colour, linewidth=0.6, zorder=3)
        sheet.text(cx, y - PAD / 2, _ports(node), ha="center", va="top", multialignment="center", zorder=3,
                   **PORT_FONT)
    return left, cy - slot.height / 2, right, top


def _draw_arrow(sheet: Sheet, points: list[tuple[float, float]], text: str) -> None:
    if len(points) > 2:
        xs, ys = zip(*points[:-1])
        sheet.ax.plot(xs, ys, zorder=1, solid_joinstyle="round", **LINE)
    sheet.arrow(points[-2], points[-1])
    (x0, y0), (x1, y1) = points[0], points[1]
    sheet.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="center", multialignment="center", zorder=4,
               bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"}, **EDGE_FONT)
