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
from mimo_builder._internal.assembly.lora import is_adapter_key, merged_weights
from mimo_builder._internal.hf import files
from mimo_builder._internal.hf.mapping import (
    HFConfigError,
    HFMapping,
    HFShapeError,
    HFWeightsError,
    MissingHFTensorsError,
    UnknownHFTensorsError,
    listed,
    problem_text,
)


def mapping_of(builder) -> HFMapping:
    """The builder's mapping; a ConfigError-like HFWeightsError when it reads no HF weights."""
    hook = getattr(builder, "hf_mapping", None)
    mapping = hook() if hook is not None else None
    if mapping is None:
        raise HFWeightsError(f"builder {type(builder).__name__} does not read Hugging Face weights "
                             "(it defines no hf_mapping())")
    return mapping


def model_prefix(mapping: HFMapping, names) -> str:
    """The prefix under which the folder holds most of the mapping's tensors."""
    sources, names = mapping.sources(), set(names)
    return max(mapping.prefixes, key=lambda p: sum(p + s in names for s in sources))


def key_problems(mapping: HFMapping, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(unknown, missing) tensor names: in the folder but neither read nor skipped, and needed
    but absent (both with the model prefix)."""
    prefix = model_prefix(mapping, shapes)
    inside = {name[len(prefix):] for name in shapes if name.startswith(prefix)}
    sources = mapping.sources()
    unknown = sorted(prefix + n for n in inside - sources if not mapping.is_skipped(n))
    missing = sorted(prefix + n for n in sources - inside)
    return unknown, missing


def check_folder(builder, folder: str | Path, where: str) -> None:
    """Raise the first kind of problem (folder/config, unknown, missing tensors) for ``builder``
    and ``folder``; ``where`` names the node in messages."""
    mapping = mapping_of(builder)
    problems = files.folder_problems(folder)
    if problems:
        raise HFWeightsError(f"{where}: {problems[0]}")
    config = mapping.config_problems(files.read_config(folder))
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


def base_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's parameters by name, LoRA adapters left out (they have no Hugging Face name)."""
    return {name: p for name, p in module.named_parameters() if not is_adapter_key(name)}


def _params(module: torch.nn.Module, mapping: HFMapping, where: str) -> dict[str, torch.nn.Parameter]:
    params = base_parameters(module)
    wanted = {rule.param for rule in mapping.rules}
    if set(params) != wanted:
        raise HFWeightsError(f"{where}: the Hugging Face mapping and the built module disagree: the module "
                             f"lacks {listed(wanted - set(params))}; the mapping misses {listed(set(params) - wanted)}")
    return params


def shape_problems(module, mapping: HFMapping, folder: str | Path, tp_size: int, where: str) -> list[str]:
    """Tensors whose shapes do not make the node's parameters (headers only, on meta tensors)."""
    shapes = files.tensor_shapes(folder)
    prefix = model_prefix(mapping, shapes)
    params = _params(module, mapping, where)
    problems = []
    for rule in mapping.rules:
        want = full_shape(params[rule.param], tp_size)
        have = [shapes[prefix + s] for s in rule.sources]
        try:
            made = rule.join([torch.empty(s, device="meta") for s in have], want).shape
        except RuntimeError:
            made = None
        if made != want:
            got = ", ".join(f"{prefix + s} {tuple(h)}" for s, h in zip(rule.sources, have))
            problems.append(f"{where}: {got} cannot make {rule.param} {tuple(want)}")
    return problems


def load_hf(chunks, builder, folder: str | Path, pg_collection=None, where: str = "node") -> None:
    """Copy the Hugging Face weights in ``folder`` into a built node's chunks (this rank's TP
    shard of each). Raises an :class:`HFWeightsError` subclass before copying anything when the
    folder does not fit."""
    check_folder(builder, folder, where)
    mapping = mapping_of(builder)
    tp_rank, tp_size = _tp(pg_collection)
    module = _single_chunk(chunks)
    problems = shape_problems(module, mapping, folder, tp_size, where)
    if problems:
        raise HFShapeError("Hugging Face tensors do not fit:\n" + problem_text(problems))
    copy_weights(module, mapping, folder, tp_rank, tp_size)


def copy_weights(module, mapping: HFMapping, folder: str | Path, tp_rank: int, tp_size: int) -> None:
    """Read, convert and copy every rule's tensors (checks already done)."""
    prefix = model_prefix(mapping, files.tensor_shapes(folder))
    tensors = files.read_tensors(folder, [prefix + s for s in sorted(mapping.sources())])
    params = base_parameters(module)
    with torch.no_grad():
        for rule in mapping.rules:
            param = params[rule.param]
            full = rule.join([tensors[prefix + s] for s in rule.sources], full_shape(param, tp_size))
            param.copy_(tp_shard.shard(full, param, tp_rank, tp_size))


def export_hf(chunks, builder, folder: str | Path, pg_collection=None) -> Path | None:
    """Write a node's weights in Hugging Face layout (safetensors + config.json) to ``folder``.

    Collective over the node's TP group (shards are gathered); one rank of the node writes and
    gets the folder back, the others get None. Import of the result is bitwise the same weights.
    """
    mapping = mapping_of(builder)
    _, tp_size = _tp(pg_collection)
    module = _single_chunk(chunks)
    params = {**_params(module, mapping, type(builder).__name__), **merged_weights(module)}  # LoRA folded in
    tensors: dict[str, torch.Tensor] = {}
    for rule in mapping.rules:
        param = params[rule.param]
        full = param.detach().clone() if tp_size == 1 else tp_shard.unshard(param, full_shape(param, tp_size),
                                                                            pg_collection.tp)
        tensors.update(zip(rule.sources, rule.split(full)))
    if mapping.constants is not None:
        tensors.update(mapping.constants())
    if not _writes(pg_collection):
        return None
    return files.write(folder, tensors, mapping.hf_config())


def _tp(pg_collection) -> tuple[int, int]:
    if pg_collection is None:
        return 0, 1
    return pg_collection.tp.rank(), pg_collection.tp.size()


def _writes(pg_collection) -> bool:
    """The node's first rank: TP rank 0 of the first data-parallel replica."""
    if pg_collection is None:
        return True
    dp = getattr(pg_collection, "dp_cp", None) or getattr(pg_collection, "dp", None)
    return pg_collection.tp.rank() == 0 and (dp is None or dist.get_rank(dp) == 0)
