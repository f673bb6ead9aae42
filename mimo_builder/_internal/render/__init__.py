"""Pictures of a graph and its placement (``mimo-builder render``).

``yaml`` and ``json`` print the document itself; ``dot`` and ``mermaid`` draw the graph as text
(:mod:`.text`); ``svg`` and ``png`` draw the graph and the placement grid with matplotlib
(:mod:`.draw`, imported only for them). Every picture comes from one :class:`.scene.Scene`.
"""

from __future__ import annotations

import difflib
import os
from typing import IO

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.document.graph import Graph

FORMATS = ("yaml", "json", "dot", "mermaid", "svg", "png")
PICTURES = ("svg", "png")
VIEWS = ("graph", "placement", "both")
SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".dot": "dot", ".gv": "dot", ".mmd": "mermaid",
            ".mermaid": "mermaid", ".svg": "svg", ".png": "png"}


def render(graph: Graph, fmt: str, *, world_size: int | None = None, view: str = "both") -> str | bytes:
    """``graph`` in format ``fmt``: text for yaml/json/dot/mermaid, bytes for svg/png. Pictures
    validate the graph on ``world_size`` ranks (default: the smallest world its placements need)."""
    if fmt == "yaml":
        return graph.to_yaml()
    if fmt == "json":
        return graph.to_json() + "\n"
    from mimo_builder._internal.render.scene import build_scene

    scene = build_scene(graph, world_size)
    if fmt in PICTURES:
        from mimo_builder._internal.render.draw import draw

        return draw(scene, view, fmt)
    from mimo_builder._internal.render.text import to_dot, to_mermaid

    return to_dot(scene) if fmt == "dot" else to_mermaid(scene)


def choose_format(fmt: str | None, as_json: bool, out: str | None) -> str:
    """The format asked for: ``--format``, ``--json`` (its alias for json), else the suffix of
    ``-o OUT``, else yaml. Conflicting or unknown choices raise ConfigError."""
    if fmt is not None and fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}{hint}")
    if as_json and fmt not in (None, "json"):
        raise ConfigError(f"--json is --format json, but --format {fmt} was given too; give one of them")
    fmt = "json" if as_json else fmt
    implied = SUFFIXES.get(os.path.splitext(out)[1].lower()) if out else None
    if fmt is not None and implied is not None and implied != fmt:
        raise ConfigError(f"-o {out!r} names a .{os.path.splitext(out)[1][1:]} file but the format is {fmt}; "
                          f"name the file .{fmt if fmt != 'mermaid' else 'mmd'} or change --format")
    if fmt is None and out and implied is None:
        raise ConfigError(f"-o {out!r}: cannot tell the format from the file name; add --format "
                          f"({', '.join(FORMATS)})")
    return fmt or implied or "yaml"


def check_request(fmt: str, *, out: str | None, world_size: int | None, view: str | None, stdout: IO) -> None:
    """Refuse, before any work, options that do not apply to ``fmt`` and outputs that cannot be written."""
    if view is not None and view not in VIEWS:
        raise ConfigError(f"unknown --view {view!r}: choose one of {', '.join(VIEWS)}")
    if view is not None and fmt not in PICTURES:
        raise ConfigError(f"--view applies to svg and png; {fmt} shows the graph only")
    if world_size is not None and fmt in ("yaml", "json"):
        raise ConfigError(f"--world-size applies to pictures (dot, mermaid, svg, png); {fmt} prints the document")
    if out is None and fmt in PICTURES and stdout.isatty():
        raise ConfigError(f"--format {fmt} writes a picture, not text for a terminal: add -o FILE.{fmt} "
                          "(or redirect stdout to a file)")
    if out is not None:
        _check_writable(out)


def _check_writable(out: str) -> None:
    folder = os.path.dirname(out) or "."
    if os.path.isdir(out):
        raise ConfigError(f"-o {out!r} is a folder; name a file in it")
    if not os.path.isdir(folder):
        raise ConfigError(f"-o {out!r}: the folder {folder!r} does not exist")


def write(data: str | bytes, out: str | None, stdout: IO) -> None:
    """Write ``data`` to the file ``out`` (replacing it), or to ``stdout``."""
    if out is None and isinstance(data, str):
        stdout.write(data)
        return
    payload = data.encode() if isinstance(data, str) else data
    if out is None:
        stdout.flush()
        stdout.buffer.write(payload)
        return
    try:
        with open(out, "wb") as file:
            file.write(payload)
    except OSError as err:
        raise ConfigError(f"-o {out!r}: cannot write it ({err.strerror or err})") from None
