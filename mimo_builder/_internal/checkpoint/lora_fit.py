"""Whether a checkpoint's LoRA adapters are the ones the document asks for.

A load takes adapter tensors by name: adapters of other targets would be dropped without a
word, and another ``alpha`` would rescale every update. So the manifest records each node's
adapters (:class:`~mimo_builder._internal.checkpoint.files.LoraRecord`) and a load compares
them with the document's ``lora:`` before any weight is touched. A checkpoint written before
the record existed is read through its graph document, which holds the saving run's ``lora:``.
"""

from __future__ import annotations

from pydantic import ValidationError

from mimo_builder._internal.checkpoint.files import LoraRecord, Manifest
from mimo_builder._internal.document.graph import NodeLora


def lora_record(lora: NodeLora | None, builder) -> LoraRecord | None:
    """``lora`` as the manifest records it, its targets resolved through ``builder``'s
    ``linear_layers()`` where the document left them out (None without LoRA)."""
    if lora is None:
        return None
    targets = lora.targets if lora.targets is not None else builder.linear_layers()
    return LoraRecord(rank=lora.rank, alpha=lora.alpha if lora.alpha is not None else lora.rank,
                      targets=None if targets is None else sorted(set(targets)))


def saved_lora(manifest: Manifest, name: str, builder) -> LoraRecord | None:
    """The adapters the checkpoint holds of node ``name``: its record, or for an older checkpoint
    the ``lora:`` of its graph document (None: no adapters)."""
    record = manifest.nodes[name]
    if "lora" in record.model_fields_set:
        return record.lora
    declared = manifest.graph.get("nodes", {}).get(name, {}).get("lora")
    try:
        return lora_record(None if declared is None else NodeLora.model_validate(declared), builder)
    except ValidationError:
        return None  # an unreadable old document: the tensors' shapes are still checked on load


def lora_problems(manifest: Manifest, name: str, node, builder) -> list[str]:
    """How node ``name``'s adapters in the checkpoint differ from ``node.lora`` (empty when they
    agree, or when the checkpoint holds no weights of the node)."""
    if not manifest.nodes[name].saved:
        return []
    theirs, ours = saved_lora(manifest, name, builder), lora_record(node.lora, builder)
    if theirs == ours:
        return []
    where = f"node '{name}' lora"
    if ours is None:
        return [f"{where}: the checkpoint holds LoRA adapters ({_describe(theirs)}) and the document declares "
                f"none, so a load would drop them; declare lora: {_as_yaml(theirs)} for the node"]
    if theirs is None:
        return [f"{where}: the checkpoint holds no LoRA adapters of the node, the document asks for "
                f"{_describe(ours)}; drop lora: to resume, or start new adapters on these weights with "
                "init: {checkpoint: DIR}"]
    diff = [f"{field} {_show(getattr(theirs, field))} in the checkpoint, {_show(getattr(ours, field))} in the "
            "document" for field in ("rank", "alpha", "targets") if getattr(theirs, field) != getattr(ours, field)]
    return [f"{where}: {'; '.join(diff)}; a load would drop or rescale adapters. Declare the checkpoint's "
            f"settings (lora: {_as_yaml(theirs)}) to load it"]


def _describe(record: LoraRecord) -> str:
    return f"rank {record.rank}, alpha {_show(record.alpha)}, targets {_show(record.targets)}"


def _show(value) -> str:
    if value is None:
        return "every linear layer"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _as_yaml(record: LoraRecord) -> str:
    targets = "" if record.targets is None else f", targets: [{', '.join(record.targets)}]"
    return f"{{rank: {record.rank}, alpha: {record.alpha:g}{targets}}}"
