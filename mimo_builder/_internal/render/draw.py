"""SVG and PNG pictures with matplotlib: the graph (layered left to right) and its placement grid.

matplotlib is imported here only when a picture is asked for, and used without pyplot: one
``Figure`` on the Agg canvas, no GUI backend, no global figure state. Everything is laid out in
inches (one data unit is one inch), with text sizes measured by the renderer, so boxes fit
their labels and nothing overlaps whatever the names.
"""

from __future__ import annotations

from mimo_builder._internal.render.draw_graph import graph_panel
from mimo_builder._internal.render.draw_placement import placement_panel
from mimo_builder._internal.render.scene import Scene
from mimo_builder._internal.render.sheet import MARGIN, RC, Sheet


def draw(scene: Scene, view: str, fmt: str) -> bytes:
    """The picture of ``scene`` as SVG or PNG bytes; ``view`` is 'graph', 'placement' or 'both'."""
    import matplotlib

    with matplotlib.rc_context(RC):
        sheet = Sheet()
        panels = []
        if view in ("graph", "both"):
            panels.append(graph_panel(scene, sheet, with_world=view == "graph"))
        if view in ("placement", "both"):
            panels.append(placement_panel(scene, sheet))
        width = max(p.width for p in panels) + 2 * MARGIN
        height = sum(p.height for p in panels) + MARGIN * (len(panels) + 1)
        top = height - MARGIN
        for panel in panels:
            panel.draw(MARGIN, top)
            top -= panel.height + MARGIN
        return sheet.save(width, height, fmt)
