"""``mimo-builder export``: a trained graph's nodes as Hugging Face folders, with its document.

Every rank builds the graph, loads the checkpoint's weights (no optimizer), and each node whose
builder maps to a Hugging Face model is written to ``OUT/<node>/`` (``config.json`` +
``model.safetensors``, LoRA adapters folded into the weights); rank 0 writes ``OUT/graph.yaml``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from mimo_builder._internal.assembly.trained import build_trained
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.errors import ConfigError, MimoError
from mimo_builder._internal.hf.nodes import export_node
from mimo_builder._internal.hf.whole import WholeModelFormat, compose, format_named

GRAPH_FILE = "graph.yaml"
TOKENIZER_FOLDER = "tokenizer"
"""Where export copies the graph's Hugging Face tokenizer (``tokenizer: {hf: DIR}``)."""
TOKENIZER_FILE_STARTS = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")
"""Names of the files of a Hugging Face tokenizer folder that ``export --as`` copies."""
SKIPPED = "not exported: "
"""How a skipped node's line starts (its reason follows)."""


def export(graph: Graph, load: str, out: str, nproc: int | None = None, as_format: str | None = None) -> list[str]:
    """Check the checkpoint and ``out`` (before any rank starts), export on ``nproc`` ranks (default:
    the checkpoint's world size); returns one line per node and the document's path. ``as_format``
    (``export --as``) writes the whole model as one folder of that installed format instead."""
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.checkpoint.files import read_manifest, resolve
    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.platform.output_paths import check_folder
    from mimo_builder._internal.validation import validate_graph

    check_folder(out, "-o")
    fmt = format_named(as_format) if as_format else None
    if fmt is not None:
        fmt.nestings(graph)  # a graph this format cannot hold is named now, node by node
    nproc = nproc or read_manifest(resolve(load)).world_size
    valid = validate_graph(graph, nproc)
    reasons = {name: _layout_reason(valid, name) for name in valid.order}
    (_raise_if_any if fmt is not None else _raise_if_none)(valid.order, reasons)
    check_resumable(valid, load)  # read once: manifest, graph, shards
    if fmt is not None:
        return _export_whole(fmt, graph, valid.order, load, out, nproc)
    written = launch(export_trained, nproc, graph, load, out)[0]
    _raise_if_none(valid.order, _skipped(written))
    copied = [f"tokenizer: {Path(out) / TOKENIZER_FOLDER}"] if graph.tokenizer and graph.tokenizer.hf else []
    return [f"node '{name}': {where}" for name, where in written.items()] + copied + [
        f"graph document: {Path(out) / GRAPH_FILE}"]


def _export_whole(fmt: WholeModelFormat, graph: Graph, nodes: list[str], load: str, out: str,
                  nproc: int) -> list[str]:
    """Every node exported to a scratch folder beside ``out``, then composed into ``out``."""
    from mimo_builder._internal.platform.launch import launch

    Path(out).mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=".export-parts-", dir=Path(out).resolve().parent))
    try:
        _raise_if_any(nodes, _skipped(launch(export_trained, nproc, graph, load, str(parts))[0]))
        compose(fmt, graph, {name: parts / name for name in nodes}, out)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    copied = _copy_tokenizer_files(graph, Path(out))
    return [f"{fmt.name} model: {out} (nodes {', '.join(nodes)})"] + (
        [f"tokenizer: {len(copied)} files copied into {out}"] if copied else [])


def _skipped(written: dict[str, str]) -> dict[str, str]:
    return {name: where.removeprefix(SKIPPED) for name, where in written.items() if where.startswith(SKIPPED)}


def _raise_if_any(nodes: list[str], skipped: dict[str, str | None]) -> None:
    """ConfigError naming why each skipped node is, when any is (a whole model needs every node)."""
    reasons = {name: why for name, why in skipped.items() if why is not None}
    if reasons:
        raise ConfigError("export --as: every node must be written, and these cannot be:\n" +
                          "\n".join(f"  - node '{name}': {why}" for name, why in reasons.items()))


def _copy_tokenizer_files(graph: Graph, out: Path) -> list[str]:
    """The graph's Hugging Face tokenizer files, copied into the whole model's folder (where
    transformers looks for them)."""
    spec = graph.tokenizer
    if spec is None or spec.hf is None:
        return []
    copied = []
    for path in sorted(Path(spec.hf).iterdir()):
        if path.is_file() and path.name.startswith(TOKENIZER_FILE_STARTS) and path.name != "config.json":
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def _raise_if_none(nodes: list[str], skipped: dict[str, str | None]) -> None:
    """ConfigError naming why each node is skipped, when every one of ``nodes`` is."""
    reasons = {name: why for name, why in skipped.items() if why is not None}
    if reasons and len(reasons) == len(nodes):
        raise ConfigError("export: no node of the graph can be exported:\n" +
                          "\n".join(f"  - node '{name}': {reasons[name]}" for name in nodes))


def export_trained(graph: Graph, load: str, out: str) -> dict[str, str]:
    """Run in every rank; returns, on rank 0, node -> the folder written or why not ({} elsewhere)."""
    with build_trained(graph, load) as model:
        written = {}
        for name in model.valid.order:
            reason = _not_exportable(model, name)
            if reason is not None:
                written[name] = f"{SKIPPED}{reason}"
                continue
            try:  # every rank of the node meets the same weights, so the same verdict
                folder = export_node(model, name, Path(out) / name)
            except MimoError as err:  # weights its Hugging Face counterpart cannot hold
                written[name] = f"{SKIPPED}{err}"
                continue
            if folder is not None:
                written[name] = str(folder)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, written, group=model.control)
    if dist.get_rank() != 0:
        return {}
    Path(out).mkdir(parents=True, exist_ok=True)  # no node may have written a folder into it
    (Path(out) / GRAPH_FILE).write_text(_with_tokenizer(graph, Path(out)).to_yaml())
    merged = {k: v for part in gathered for k, v in part.items()}
    return {name: merged[name] for name in model.valid.order}


def _with_tokenizer(graph: Graph, out: Path) -> Graph:
    """The graph, its Hugging Face tokenizer folder copied to ``out/tokenizer`` and named there."""
    spec = graph.tokenizer
    if spec is None or spec.hf is None:
        return graph
    shutil.copytree(spec.hf, out / TOKENIZER_FOLDER, dirs_exist_ok=True)
    return graph.model_copy(update={"tokenizer": spec.model_copy(update={"hf": str(out / TOKENIZER_FOLDER)})})


def _not_exportable(model, name: str) -> str | None:
    """Why node ``name`` has no Hugging Face folder (the same answer on every rank), or None."""
    reason = _layout_reason(model.valid, name)
    if reason is None and model.hosts(name) and len(model.chunks(name)) > 1:
        return f"it has virtual pipeline stages ({len(model.chunks(name))} chunks); export at pp=1"
    return reason


def _layout_reason(valid, name: str) -> str | None:
    """Why node ``name`` has no Hugging Face folder, known from the document alone, or None."""
    from mimo_builder._internal.hf.convert import mapping_of

    try:
        mapping_of(valid.builders[name])
    except MimoError as err:
        return str(err)
    layout = valid.layouts[name]
    return f"it has pipeline stages (pp={layout.pp}); export at pp=1" if layout.pp > 1 else None
