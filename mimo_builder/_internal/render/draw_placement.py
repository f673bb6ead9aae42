"""The placement panel: one row per node, one column per rank (or per run of ranks hosting the
same nodes, in large worlds). A cell is filled in the node's colour where the node lives and
shows the coordinates the rank has in it; cells stacked in one column are colocated nodes."""

from __future__ import annotations

from mimo_builder._internal.render.sheet import PAD, Panel, Sheet, titled
from mimo_builder._internal.render.scene import Column, Scene, plural, rank_columns

CELL_FONT = {"fontsize": 7}
HEADER_FONT = {"fontsize": 7, "color": "#333333"}
NAME_FONT = {"fontsize": 9, "fontweight": "bold"}
DETAIL_FONT = {"fontsize": 7, "color": "#444444"}
LEGEND_FONT = {"fontsize": 8}
CELL_PAD = 0.05  # inches around a cell's text
MIN_CELL = (0.36, 0.3)  # inches: the smallest cell, so short labels still read as a grid
EMPTY_FILL, EMPTY_EDGE = "#f3f3f3", "#dddddd"
SWATCH = 0.16  # inches: a legend's colour square
FROZEN_HATCH = "///"


def placement_panel(scene: Scene, sheet: Sheet) -> Panel:
    """The placement grid of ``scene`` with its legend, titled, sized to its content."""
    columns = rank_columns(scene)
    merged = len(columns) < scene.world_size
    texts = {(i, name): _cell_text(coords) for i, col in enumerate(columns) for name, coords in col.cells.items()}
    headers = [_header(col, merged) for col in columns]
    rows = [(n, f"{n.ranks_label} · {n.split_text}") for n in scene.nodes]
    cell_w, cell_h = _cell_size(sheet, list(texts.values()), headers, rows)
    label_w = max(max(sheet.measure(n.name, **NAME_FONT)[0], sheet.measure(d, **DETAIL_FONT)[0])
                  for n, d in rows) + 2 * PAD
    header_h = max(sheet.measure(h, **HEADER_FONT)[1] for h in headers) + 2 * CELL_PAD
    grid_w, grid_h = label_w + cell_w * len(columns), header_h + cell_h * len(rows)
    legend = _legend(scene, sheet, max(grid_w, 7.0))

    def draw_body(left: float, top: float) -> None:
        sheet.text(left + label_w - PAD, top - header_h / 2, "rank", ha="right", va="center", **HEADER_FONT)
        for i, header in enumerate(headers):
            sheet.text(left + label_w + (i + 0.5) * cell_w, top - header_h / 2, header, ha="center",
                       va="center", multialignment="center", **HEADER_FONT)
        for r, (node, detail) in enumerate(rows):
            y = top - header_h - (r + 1) * cell_h
            sheet.text(left + PAD, y + cell_h / 2 + PAD / 4, node.name, va="bottom", color=node.edge_colour,
                       **NAME_FONT)
            sheet.text(left + PAD, y + cell_h / 2, detail, va="top", **DETAIL_FONT)
            for i in range(len(columns)):
                _draw_cell(sheet, node, texts.get((i, node.name)), left + label_w + i * cell_w, y, cell_w, cell_h)
        legend.draw(left, top - grid_h - PAD)

    how = ("runs of consecutive ranks hosting the same nodes" if merged else "one column per rank")
    title = f"Placement: {plural(scene.world_size, 'rank')} × {plural(len(scene.nodes), 'node')}"
    note = (f"{scene.world_text}\n{how}; a cell shows the coordinates its ranks have in the node\n"
            "cells stacked in one column: colocated nodes (they share those ranks)")
    body = Panel(max(grid_w, legend.width), grid_h + PAD + legend.height, draw_body)
    return titled(sheet, title, note, body)


def _cell_text(coords: dict[str, str]) -> str:
    return "\n".join(f"{dim} {coords[dim]}" for dim in ("tp", "cp", "dp", "pp") if dim in coords)


def _header(column: Column, merged: bool) -> str:
    if not merged or column.first == column.last:
        return column.title
    return f"{column.title}\n{column.last - column.first + 1:,} ranks"


def _cell_size(sheet: Sheet, texts: list[str], headers: list[str], rows) -> tuple[float, float]:
    sizes = [sheet.measure(t, **CELL_FONT) for t in set(texts)]
    widths = [w for w, _ in sizes] + [sheet.measure(h, **HEADER_FONT)[0] for h in set(headers)]
    label_h = max(sheet.measure(n.name, **NAME_FONT)[1] + sheet.measure(d, **DETAIL_FONT)[1] for n, d in rows)
    heights = [h for _, h in sizes] + [label_h]
    return max(max(widths) + 2 * CELL_PAD, MIN_CELL[0]), max(max(heights) + 2 * CELL_PAD, MIN_CELL[1])


def _draw_cell(sheet: Sheet, node, text: str | None, x: float, y: float, width: float, height: float) -> None:
    if text is None:
        sheet.box(x, y, width, height, fill=EMPTY_FILL, edge=EMPTY_EDGE)
        return
    sheet.box(x, y, width, height, fill=node.fill_colour, edge=node.edge_colour,
              hatch=FROZEN_HATCH if node.frozen else None)
    sheet.text(x + width / 2, y + height / 2, text, ha="center", va="center", multialignment="center", zorder=3,
               bbox={"boxstyle": "square,pad=0.05", "facecolor": node.fill_colour, "edgecolor": "none"}
               if node.frozen else None, **CELL_FONT)


def _legend(scene: Scene, sheet: Sheet, width: float) -> Panel:
    """Colour squares naming each node (and builder), frozen and empty cells; wrapped to ``width``."""
    items = [(f"{n.name} ({n.builder})", n.fill_colour, n.edge_colour, None) for n in scene.nodes]
    if any(n.frozen for n in scene.nodes):
        items.append(("frozen (no gradients)", "white", "#555555", FROZEN_HATCH))
    items.append(("rank does not host the node", EMPTY_FILL, EMPTY_EDGE, None))
    placed, x, y, line_h = [], 0.0, 0.0, max(SWATCH, sheet.measure("Ag", **LEGEND_FONT)[1]) + PAD
    for label, fill, edge, hatch in items:
        item_w = SWATCH + PAD + sheet.measure(label, **LEGEND_FONT)[0] + 3 * PAD
        if x and x + item_w > width:
            x, y = 0.0, y + line_h
        placed.append((x, y, label, fill, edge, hatch))
        x += item_w

    def draw_legend(left: float, top: float) -> None:
        for x, y, label, fill, edge, hatch in placed:
            middle = top - y - line_h / 2
            sheet.box(left + x, middle - SWATCH / 2, SWATCH, SWATCH, fill=fill, edge=edge, hatch=hatch)
            sheet.text(left + x + SWATCH + PAD, middle, label, va="center", **LEGEND_FONT)

    return Panel(width, y + line_h, draw_legend)
