"""Load Hugging Face weights into a built node (sharded to its TP rank), and export them back.

Generic: the builder's :class:`~mimo_builder._internal.hf.mapping.HFMapping` says which HF tensors make
which parameter. Checks come before any weight is copied: config.json fields, unknown and
missing tensors (from the safetensors headers), then each tensor's shape against the node's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mimo_builder._internal.assembly import tp_shard
from mimo_builder._internal.assembly.lora import merged_weights
from mimo_builder._internal.hf import files
from mimo_builder._internal.hf.mapping import (
    HFConfigError,
    HFMapping,
    HFShapeError,
    HFWeightsError,
    MissingHFTensorsError,
    Nesting,
    UnknownHFTensorsError,
    listed,
    problem_text,
)
from mimo_builder._internal.hf.shards import HeldTensors


def mapping_of(builder, hf_config: dict | None = None) -> HFMapping:
    """The builder's mapping (to export), or the one that reads a folder whose config.json is
    ``hf_config`` (a builder may read several model types); a ConfigError-like HFWeightsError
    when it reads no HF weights."""
    if hf_config is None:
        hook = getattr(builder, "hf_mapping", None)
        mapping = hook() if hook is not None else None
    else:
        hook = getattr(builder, "hf_mapping_for", None) or (lambda _config: builder.hf_mapping())
        mapping = hook(hf_config)
    if mapping is None:
        raise HFWeightsError(f"builder {type(builder).__name__} does not read Hugging Face weights "
                             "(it defines no hf_mapping())")
    return mapping


def model_nesting(mapping: HFMapping, names) -> Nesting:
    """Where (of the mapping's ``prefixes``) the folder holds most of the mapping's tensors."""
    sources, names = mapping.sources(), set(names)
    nestings = [Nesting.of(p) for p in mapping.prefixes]
    return max(nestings, key=lambda n: sum(n.folder_name(s) in names for s in sources))


def key_problems(mapping: HFMapping, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(unknown, missing) tensor names: in the folder but neither read nor skipped, and needed
    but absent (both as the folder names them)."""
    nesting = model_nesting(mapping, shapes)
    inside = {source for name in shapes if (source := nesting.source_name(name)) is not None}
    sources = mapping.sources()
    unknown = sorted(nesting.folder_name(n) for n in inside - sources if not mapping.is_skipped(n))
    missing = sorted(nesting.folder_name(n) for n in sources - inside)
    return unknown, missing


def check_folder(builder, folder: str | Path, where: str) -> None:
    """Raise the first kind of problem (folder/config, unknown, missing tensors) for ``builder``
    and ``folder``; ``where`` names the node in messages."""
    mapping_of(builder)
    problems = files.folder_problems(folder)
    if problems:
        raise HFWeightsError(f"{where}: {problems[0]}")
    hf_config = files.read_config(folder)
    mapping = mapping_of(builder, hf_config)
    config = mapping.config_problems(hf_config)
    if config:
        raise HFConfigError(f"{where}: {folder} does not describe this node: " + "; ".join(config))
    unknown, missing = key_problems(mapping, files.tensor_shapes(folder))
    if unknown:
        raise UnknownHFTensorsError(f"{where}: {folder} holds {len(unknown)} tensor(s) the node does not read: "
                                    f"{listed(unknown)}")
    if missing:
        raise MissingHFTensorsError(f"{where}: {folder} lacks {len(missing)} tensor(s) the node needs: "
                                    f"{listed(missing)}")


def folder_problems(builder, folder: str | Path, where: str) -> list[str]:
    """:func:`check_folder` as a list of problems (empty when the folder fits), for validation."""
    try:
        check_folder(builder, folder, where)
    except HFWeightsError as err:
        return [str(err)]
    return []


def _single_chunk(chunks) -> torch.nn.Module:
    if len(chunks) != 1:
        raise HFWeightsError(f"Hugging Face weights load into one pipeline stage; the node has {len(chunks)} chunks")
    return tp_shard.unwrap(chunks[0])


def full_shape(param: torch.Tensor, tp_size: int) -> torch.Size:
    """The TP=1 shape of a (possibly TP-sharded) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return torch.Size(shape)


def _held(module: torch.nn.Module, mapping: HFMapping, where: str) -> HeldTensors:
    """This rank's tensors under the mapping's names, checked against its rules (a rule may name an
    expert another expert-parallel rank holds)."""
    wanted = {rule.param for rule in mapping.rules}
    held = HeldTensors(module, wanted)
    lacks = {name for name in wanted - set(held.tensors) if not held.elsewhere(name)}
    misses = set(held.tensors) - wanted
    if lacks or misses:
        raise HFWeightsError(f"{where}: the Hugging Face mapping and the built module disagree: the module "
                             f"lacks {listed(lacks)}; the mapping misses {listed(misses)}")
    return held


def _split(held: HeldTensors, name: str, pg_collection) -> tuple[int, int]:
    """(rank, size) of the group that splits tensor ``name`` (TP, or expert-TP for experts)."""
    group = held.split_group(name, pg_collection)
    return (0, 1) if group is None else (group.rank(), group.size())


def shape_problems(module, mapping: HFMapping, folder: str | Path, pg_collection, where: str) -> list[str]:
    """Tensors whose shapes do not make the node's parameters on this rank (headers only, on meta tensors)."""
    shapes = files.tensor_shapes(folder)
    nesting = model_nesting(mapping, shapes)
    held = _held(module, mapping, where)
    problems = []
    for rule in mapping.rules:
        if rule.param not in held.tensors:  # an expert of another expert-parallel rank
            continue
        want = full_shape(held.tensors[rule.param], _split(held, rule.param, pg_collection)[1])
        have = [shapes[nesting.folder_name(s)] for s in rule.sources]
        try:
            made = rule.join([torch.empty(s, device="meta") for s in have], want).shape
        except RuntimeError:
            made = None
        if made != want:
            got = ", ".join(f"{nesting.folder_name(s)} {tuple(h)}" for s, h in zip(rule.sources, have))
            problems.append(f"{where}: {got} cannot make {rule.param} {tuple(want)}")
    return problems


def load_hf(chunks, builder, folder: str | Path, pg_collection=None, where: str = "node") -> None:
    """Copy the Hugging Face weights in ``folder`` into a built node's chunks (this rank's TP
    shard of each). Raises an :class:`HFWeightsError` subclass before copying anything when the
    folder does not fit."""
    check_folder(builder, folder, where)
    mapping = mapping_of(builder, files.read_config(folder))
    module = _single_chunk(chunks)
    problems = shape_problems(module, mapping, folder, pg_collection, where)
    if problems:
        raise HFShapeError("Hugging Face tensors do not fit:\n" + problem_text(problems))
    copy_weights(module, mapping, folder, pg_collection)


def copy_weights(module, mapping: HFMapping, folder: str | Path, pg_collection) -> None:
    """Read, convert and copy the tensors of every rule this rank holds (checks already done)."""
    nesting = model_nesting(mapping, files.tensor_shapes(folder))
    held = HeldTensors(module, {rule.param for rule in mapping.rules})
    rules = [rule for rule in mapping.rules if rule.param in held.tensors]
    tensors = files.read_tensors(folder, sorted({nesting.folder_name(s) for rule in rules for s in rule.sources}))
    with torch.no_grad():
        for rule in rules:
            param = held.tensors[rule.param]
            rank, size = _split(held, rule.param, pg_collection)
            full = rule.join([tensors[nesting.folder_name(s)] for s in rule.sources], full_shape(param, size))
            param.copy_(tp_shard.shard(full, param, rank, size))


def export_hf(chunks, builder, folder: str | Path, pg_collection=None) -> Path | None:
    """Write a node's weights in Hugging Face layout (safetensors + config.json) to ``folder``.

    Collective over the node's TP group (shards are gathered) and, with experts, its EP group (each
    rank's experts are gathered); one rank of the node writes and
    gets the folder back, the others get None. Import of the result is bitwise the same weights.
    """
    mapping = mapping_of(builder)
    module = _single_chunk(chunks)
    held = _held(module, mapping, type(builder).__name__)
    params = {**held.tensors, **{held.whole(n): w for n, w in merged_weights(module).items()}}  # LoRA folded in
    full = {}
    for name, param in params.items():
        size = _split(held, name, pg_collection)[1]
        full[name] = param.detach().clone() if size == 1 else tp_shard.unshard(
            param, full_shape(param, size), held.split_group(name, pg_collection))
    full.update(held.other_experts(full, pg_collection))
    tensors: dict[str, torch.Tensor] = {}
    for rule in mapping.rules:
        tensors.update(zip(rule.sources, rule.split(full[rule.param])))
    if mapping.constants is not None:
        tensors.update(mapping.constants())
    if not _writes(pg_collection):
        return None
    return files.write(folder, tensors, mapping.hf_config())


def _writes(pg_collection) -> bool:
    """The node's first rank: TP rank 0 of the first data-parallel replica."""
    if pg_collection is None:
        return True
    dp = getattr(pg_collection, "dp_cp", None) or getattr(pg_collection, "dp", None)
    return pg_collection.tp.rank() == 0 and (dp is None or dist.get_rank(dp) == 0)
