"""``mimo-builder export``: a trained graph's nodes as Hugging Face folders, with its document.

Every rank builds the graph, loads the checkpoint's weights (no optimizer), and each node whose
builder maps to a Hugging Face model is written to ``OUT/<node>/`` (``config.json`` +
``model.safetensors``, LoRA adapters folded into the weights); rank 0 writes ``OUT/graph.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from mimo_builder._internal.assembly.trained import build_trained
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.errors import ConfigError, MimoError
from mimo_builder._internal.hf.nodes import export_node

GRAPH_FILE = "graph.yaml"


def export(graph: Graph, load: str, out: str, nproc: int | None = None) -> list[str]:
    """Check the checkpoint and ``out`` (before any rank starts), export on ``nproc`` ranks (default:
    the checkpoint's world size); returns one line per node and the document's path."""
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.checkpoint.files import read_manifest, resolve
    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.validation import validate_graph

    nproc = nproc or read_manifest(resolve(load)).world_size
    check_resumable(validate_graph(graph, nproc), load)  # read once: manifest, graph, shards
    for part in (Path(out), *Path(out).parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"-o {out}: {part} is a file; give a folder")
    written = launch(export_trained, nproc, graph, load, out)[0]
    return [f"node '{name}': {where}" for name, where in written.items()] + [
        f"graph document: {Path(out) / GRAPH_FILE}"]


def export_trained(graph: Graph, load: str, out: str) -> dict[str, str]:
    """Run in every rank; returns, on rank 0, node -> the folder written or why not ({} elsewhere)."""
    with build_trained(graph, load) as model:
        written = {}
        for name in model.valid.order:
            reason = _not_exportable(model, name)
            if reason is not None:
                written[name] = f"not exported: {reason}"
                continue
            try:  # every rank of the node meets the same weights, so the same verdict
                folder = export_node(model, name, Path(out) / name)
            except MimoError as err:  # weights its Hugging Face counterpart cannot hold
                written[name] = f"not exported: {err}"
                continue
            if folder is not None:
                written[name] = str(folder)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, written, group=model.control)
    if dist.get_rank() != 0:
        return {}
    (Path(out) / GRAPH_FILE).write_text(graph.to_yaml())
    merged = {k: v for part in gathered for k, v in part.items()}
    return {name: merged[name] for name in model.valid.order}


def _not_exportable(model, name: str) -> str | None:
    """Why node ``name`` has no Hugging Face folder (the same answer on every rank), or None."""
    from mimo_builder._internal.hf.convert import mapping_of

    try:
        mapping_of(model.valid.builders[name])
    except MimoError as err:
        return str(err)
    layout = model.valid.layouts[name]
    if layout.pp > 1 or len(model.chunks(name) if model.hosts(name) else [None]) > 1:
        return f"it has pipeline stages (pp={layout.pp}); export at pp=1"
    return None
