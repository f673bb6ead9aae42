"""The canvas the pictures are drawn on: a matplotlib Figure on the Agg canvas (no pyplot, no
global figure state), boxes measured before they are placed, panels stacked top to bottom.
matplotlib is imported only when a sheet is made."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass


MARGIN = 0.25  # inches around the picture and between panels
PAD = 0.08  # inches inside a box, around its text
DPI = 150  # PNG resolution
TITLE_FONT = {"fontsize": 11, "fontweight": "bold"}
NOTE_FONT = {"fontsize": 8, "color": "#444444"}
RC = {"svg.fonttype": "none", "svg.hashsalt": "mimo-builder", "font.family": "sans-serif",
      "font.sans-serif": ["DejaVu Sans", "Verdana", "Arial", "Helvetica"]}
"""SVG keeps its text as text (searchable, small; a viewer without matplotlib's DejaVu Sans takes
the next sans-serif, no wider) and is the same bytes for the same scene."""


@dataclass
class Panel:
    """A part of the picture: its size in inches and how to draw it from a top-left corner."""

    width: float
    height: float
    draw: Callable[[float, float], None]


class Sheet:
    """A Figure whose one Axes spans it in inches, and text measurement on its renderer."""

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(dpi=DPI)  # text is measured at the resolution it is drawn at
        self._renderer = FigureCanvasAgg(self.figure).get_renderer()
        self.ax = self.figure.add_axes((0, 0, 1, 1))
        self.ax.set_axis_off()

    def measure(self, text: str, **font) -> tuple[float, float]:
        """Width and height in inches of ``text`` set in ``font``."""
        probe = self.figure.text(0, 0, text, **font)
        box = probe.get_window_extent(self._renderer)
        probe.remove()
        return box.width / self.figure.dpi, box.height / self.figure.dpi

    def text(self, x: float, y: float, text: str, **props) -> None:
        """Draw ``text`` at (x, y) in inches with matplotlib text ``props``."""
        self.ax.text(x, y, text, **props)

    def box(self, x: float, y: float, width: float, height: float, *, fill: str, edge: str,
            dashed: bool = False, hatch: str | None = None, rounded: bool = False, zorder: float = 2,
            gid: str | None = None) -> None:
        """A rectangle with its lower-left corner at (x, y); ``gid`` names it in an SVG (the group's id)."""
        from matplotlib.patches import FancyBboxPatch

        style = f"round,pad=0,rounding_size={min(0.08, height / 4)}" if rounded else "square,pad=0"
        self.ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle=style, facecolor=fill, edgecolor=edge,
                                         linewidth=1.2 if rounded else 0.8, linestyle="--" if dashed else "-",
                                         hatch=hatch, zorder=zorder, gid=gid))

    def arrow(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """A grey arrow from ``start`` to ``end`` (inches), behind the boxes."""
        self.ax.annotate("", xy=end, xytext=start, zorder=1, arrowprops={
            "arrowstyle": "-|>", "color": "#555555", "linewidth": 1.1, "shrinkA": 0, "shrinkB": 0,
            "mutation_scale": 12})

    def save(self, width: float, height: float, fmt: str) -> bytes:
        """The sheet sized ``width`` x ``height`` inches, as ``fmt`` ('svg' or 'png') bytes on white."""
        self.figure.set_size_inches(width, height)
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(0, height)
        out = io.BytesIO()
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        self.figure.savefig(out, format=fmt, dpi=DPI, metadata=metadata, facecolor="white")
        return out.getvalue()


def titled(sheet: Sheet, title: str, note: str, body: Panel) -> Panel:
    """``body`` under a bold title line and a grey note line."""
    title_w, title_h = sheet.measure(title, **TITLE_FONT)
    note_w, note_h = sheet.measure(note, **NOTE_FONT)
    head = title_h + note_h + 3 * PAD

    def draw_all(left: float, top: float) -> None:
        sheet.text(left, top, title, va="top", **TITLE_FONT)
        sheet.text(left, top - title_h - PAD, note, va="top", **NOTE_FONT)
        body.draw(left, top - head)

    return Panel(max(title_w, note_w, body.width), head + body.height, draw_all)
