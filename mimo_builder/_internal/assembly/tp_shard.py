"""Slice full (TP=1) weights into one tensor-parallel rank's shards, following MCore's
partition attributes, so a model built at any TP size can start from the same master weights.

MCore marks sharded parameters with ``tensor_model_parallel``, ``partition_dim`` and, for
parameters that pack several independently sharded parts (Mamba's ``in_proj`` holds
z, x, B, C, dt), ``partition_sizes``: each part is split across ranks separately.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard(full: torch.Tensor, local: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's piece of ``full`` for a parameter shaped like ``local``."""
    if full.shape == local.shape:
        return full
    dim = getattr(local, "partition_dim", None)
    if dim is None or not getattr(local, "tensor_model_parallel", False):
        dim = _only_differing_dim(full, local)
    sizes = getattr(local, "partition_sizes", None) or [local.shape[dim]]
    parts = full.split([size * tp_size for size in sizes], dim)
    return torch.cat([part.narrow(dim, tp_rank * size, size) for part, size in zip(parts, sizes)], dim)


def load_full_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Copy ``full_state`` (names as in ``model.named_parameters()``) into ``model``'s shards."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in full_state:
                raise KeyError(f"full state has no parameter {name!r}")
            param.copy_(shard(full_state[name], param, tp_rank, tp_size))


def _only_differing_dim(full: torch.Tensor, local: torch.Tensor) -> int:
    dims = [d for d, (a, b) in enumerate(zip(full.shape, local.shape)) if a != b]
    if len(dims) != 1 or full.dim() != local.dim():
        raise ValueError(f"cannot tell how a {tuple(full.shape)} tensor shards into {tuple(local.shape)}")
    return dims[0]


def unshard(local: torch.Tensor, full_shape: torch.Size, tp_group) -> torch.Tensor:
    """The full tensor from every TP rank's shard (inverse of :func:`shard`; collective on
    ``tp_group``, so every rank of the group must call it)."""
    if local.shape == full_shape:
        return local.detach().clone()
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(pieces, local.detach().contiguous(), group=tp_group)
    dim = getattr(local, "partition_dim", None)
    if dim is None or not getattr(local, "tensor_model_parallel", False):
        dim = _only_differing_dim(torch.empty(full_shape, device="meta"), local)
    sizes = getattr(local, "partition_sizes", None) or [local.shape[dim]]
    per_rank = [piece.split(sizes, dim) for piece in pieces]
    return torch.cat([torch.cat([parts[i] for parts in per_rank], dim) for i in range(len(sizes))], dim)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers (parameter names as a bare build has them)."""
    while hasattr(module, "module"):
        module = module.module
    return module
