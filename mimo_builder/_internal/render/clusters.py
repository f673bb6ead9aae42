"""Colocated nodes in the graph panel: members of a group (nodes on exactly the same ranks) kept
next to each other in each layer, and a dashed rounded frame behind them labelled with their
ranks, as DOT's and Mermaid's clusters are.

One frame takes in the whole group where it covers no other node's box and no other group's
frame; otherwise the group gets a frame per layer, around its members there (next to each other,
so such a frame takes in no other box).
"""

from __future__ import annotations

from mimo_builder._internal.render.scene import NodeView
from mimo_builder._internal.render.sheet import PAD, Sheet

CLUSTER_PAD = 0.1  # inches between a frame and the boxes in it
CLUSTER_FONT = {"fontsize": 7.5, "color": "#555555", "fontstyle": "italic"}
FRAME_FILL, FRAME_EDGE = "#f6f6f6", "#8c8c8c"

Rect = tuple[float, float, float, float]  # left, bottom, right, top in inches


def cluster_label(group: list[NodeView]) -> str:
    """'ranks 0-1: colocated', as in the DOT and Mermaid clusters."""
    return f"{group[0].ranks_label}: colocated"


def cluster_head(sheet: Sheet, groups: list[list[NodeView]]) -> float:
    """Inches a frame reaches above its topmost box: its label line and padding (0 without groups)."""
    return max((sheet.measure(cluster_label(g), **CLUSTER_FONT)[1] + 2 * PAD for g in groups), default=0.0)


def keep_together(layer: list[str], group_of: dict[str, int]) -> list[str]:
    """``layer``'s slot keys in the same order, except that each group's members follow its first."""
    ordered: list[str] = []
    placed: set[str] = set()
    for key in layer:
        if key in placed:
            continue
        group = group_of.get(key)
        run = [key] if group is None else [k for k in layer if group_of.get(k) == group]
        ordered += run
        placed.update(run)
    return ordered


def draw_clusters(sheet: Sheet, groups: list[list[NodeView]], boxes: dict[str, Rect], layer_of: dict[str, int],
                  head: float) -> None:
    """A labelled frame behind each group of colocated nodes, whose boxes ``boxes`` gives (drawn)."""
    whole = [_frame([boxes[n.name] for n in group], head) for group in groups]
    for i, group in enumerate(groups):
        names = {n.name for n in group}
        others = [rect for key, rect in boxes.items() if key not in names] + whole[:i] + whole[i + 1:]
        frames = [whole[i]]
        if any(_overlap(whole[i], other) for other in others):
            layers = sorted({layer_of[n.name] for n in group})
            frames = [_frame([boxes[n.name] for n in group if layer_of[n.name] == k], head) for k in layers]
        for j, frame in enumerate(frames):
            _draw_frame(sheet, frame, cluster_label(group), f"colocated_{i}" + (f"_{j}" if len(frames) > 1 else ""))


def _frame(rects: list[Rect], head: float) -> Rect:
    left, bottom, right, top = zip(*rects)
    return min(left) - CLUSTER_PAD, min(bottom) - CLUSTER_PAD, max(right) + CLUSTER_PAD, max(top) + head


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_frame(sheet: Sheet, frame: Rect, label: str, gid: str) -> None:
    """The frame (widened to fit its label), behind boxes and arrows, its label at the top left."""
    left, bottom, right, top = frame
    right = max(right, left + sheet.measure(label, **CLUSTER_FONT)[0] + 2 * PAD)
    sheet.box(left, bottom, right - left, top - bottom, fill=FRAME_FILL, edge=FRAME_EDGE, dashed=True,
              rounded=True, zorder=0, gid=gid)
    sheet.text(left + PAD, top - PAD, label, ha="left", va="top", zorder=0.5, **CLUSTER_FONT)
