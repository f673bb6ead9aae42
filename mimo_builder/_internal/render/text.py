"""The graph as Graphviz DOT and as a Mermaid flowchart: one box per node (name, builder, ranks,
split, frozen, input and output port names), one arrow per edge (ports, tokens per sample and
feature size); nodes on exactly the same ranks share a labelled cluster (colocated), other nodes
stand alone.

DOT is written here rather than through a library: every identifier and label is a
double-quoted string with ``\\`` and ``"`` escaped, which is all DOT's grammar needs.
"""

from __future__ import annotations

from mimo_builder._internal.render.scene import NodeView, Scene


def to_dot(scene: Scene) -> str:
    """A ``digraph`` drawn left to right; Graphviz's ``dot -Tsvg`` renders it."""
    lines = ["digraph mimo {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];',
             f"  label={_q(scene.world_text)}; labelloc=t;"]
    clustered = set()
    for i, group in enumerate(scene.colocated_groups()):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_q(f'{group[0].ranks_label}: colocated')}; style=dashed;")
        lines.extend(f"    {_dot_node(node)}" for node in group)
        lines.append("  }")
        clustered.update(node.name for node in group)
    lines.extend(f"  {_dot_node(node)}" for node in scene.nodes if node.name not in clustered)
    for edge in scene.edges:
        lines.append(f"  {_q(edge.src)} -> {_q(edge.dst)} [label={_q(edge.label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_node(node: NodeView) -> str:
    label = "\\n".join(_escape(line) for line in [node.name, *node.box_lines()])
    style = ', style="rounded,filled,dashed"' if node.frozen else ""
    return (f'{_q(node.name)} [label="{label}", fillcolor={_q(node.fill_colour)}, '
            f"color={_q(node.edge_colour)}{style}];")


def _q(text: str) -> str:
    return f'"{_escape(text)}"'


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_mermaid(scene: Scene) -> str:
    """A ``flowchart LR``; node ids are prefixed (``n_lm``) so no name collides with a keyword."""
    lines = ["flowchart LR"]
    clustered = set()
    for i, group in enumerate(scene.colocated_groups()):
        lines.append(f'  subgraph colocated_{i}["{group[0].ranks_label}: colocated"]')
        lines.extend(f"    {_mermaid_node(node)}" for node in group)
        lines.append("  end")
        clustered.update(node.name for node in group)
    lines.extend(f"  {_mermaid_node(node)}" for node in scene.nodes if node.name not in clustered)
    for edge in scene.edges:
        lines.append(f'  n_{edge.src} -->|"{_mermaid_text(edge.label)}"| n_{edge.dst}')
    for node in scene.nodes:
        dashes = ",stroke-dasharray:5 5" if node.frozen else ""
        lines.append(f"  style n_{node.name} fill:{node.fill_colour},stroke:{node.edge_colour}{dashes}")
    return "\n".join(lines) + "\n"


def _mermaid_node(node: NodeView) -> str:
    body = "<br/>".join(_mermaid_text(line) for line in node.box_lines())
    return f'n_{node.name}["<b>{_mermaid_text(node.name)}</b><br/>{body}"]'


def _mermaid_text(text: str) -> str:
    """Text inside a quoted Mermaid label: quotes and angle brackets as entity codes."""
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
