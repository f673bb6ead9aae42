"""``mimo-builder import-hf DIR -o GRAPH.yaml``: the graph document of a whole Hugging Face model.

The folder's ``model_type`` picks an installed :class:`~mimo_builder._internal.hf.whole.WholeModelFormat`;
the graph it declares is validated as ``validate`` would (every node's config.json fields and
tensor names against its mapping, from the headers: no weight is read) before the file is written.
"""

from __future__ import annotations

from pathlib import Path

HEADER = "# Written by mimo-builder import-hf from {folder} ({model_type}); every node reads that folder.\n"


def import_folder(folder: str, output: str) -> list[str]:
    """Write the graph of ``folder`` to ``output``; returns the lines to print. ConfigError (exit
    2) for a folder of a type no format reads, a config field a kind cannot honour, or tensors
    that do not fit, before anything is written."""
    from mimo_builder._internal.hf.whole import format_of_folder, graph_of_folder
    from mimo_builder._internal.platform.output_paths import check_file
    from mimo_builder._internal.validation import validate_graph

    check_file(output, "-o")
    fmt, config = format_of_folder(folder)
    graph = graph_of_folder(folder)
    valid = validate_graph(graph, 1)
    Path(output).write_text(HEADER.format(folder=Path(folder).resolve(), model_type=config["model_type"])
                            + graph.to_yaml())
    nodes = ", ".join(f"{name} ({graph.nodes[name].builder})" for name in valid.order)
    return [f"{folder}: {fmt.name} model -> {output}: nodes {nodes}",
            f"train it: mimo-builder run {output} --steps 10   (place its nodes in the document first)"]
