"""Check a global batch against the graph's bound input ports, and cut each node's DP shard.

Every rank holds the same global batch; a node with data-parallel size ``dp`` gives its DP
rank ``i`` samples ``[i * B/dp, (i + 1) * B/dp)``. The checks are pure and deterministic, so a
bad batch raises the same error on every rank before any communication.
"""

from __future__ import annotations

import torch

from mimo_builder.errors import MimoError
from mimo_builder.placement import Layout
from mimo_builder.validation import ValidGraph


class BatchError(MimoError, ValueError):
    """The batch does not fit the graph's inputs; names the key and the port."""


def check_batch(valid: ValidGraph, batch: dict[str, torch.Tensor]) -> int:
    """Return the global batch size, or raise BatchError listing every problem."""
    problems, sizes = [], {}
    for key, (node, port_name) in valid.inputs.items():
        port = valid.ports(node).inputs[port_name]
        if key not in batch:  # a binding promises the key, even for an optional port
            problems.append(f"batch has no {key!r}, which the graph binds to {node}.{port_name}")
            continue
        value = batch[key]
        if not isinstance(value, torch.Tensor) or value.dim() != len(port.dims):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"batch[{key!r}] for {node}.{port_name} must have {len(port.dims)} axes "
                            f"{port.dims}, got {got}")
            continue
        if port.features is not None and port.dims[-1] not in ("tokens",) and value.shape[-1] != port.features:
            problems.append(f"batch[{key!r}] for {node}.{port_name}: last axis ({port.dims[-1]}) must be "
                            f"{port.features}, got {value.shape[-1]}")
        if port.shape is not None:
            wrong = [f"{d}={n} (expected {e})" for d, n, e in zip(port.dims, value.shape, port.shape)
                     if e is not None and n != e]
            if wrong:
                problems.append(f"batch[{key!r}] for {node}.{port_name}: {', '.join(wrong)}")
        sizes[key] = value.shape[0]
    if len(set(sizes.values())) > 1:
        problems.append(f"batch keys disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()), 0)
    for name, layout in valid.layouts.items():
        if sizes and size % layout.dp:
            problems.append(f"batch size {size} is not divisible by node '{name}' data-parallel size {layout.dp}")
    if problems:
        raise BatchError("bad batch:\n" + "\n".join(f"  - {p}" for p in problems))
    return size


def shard_range(layout: Layout, dp_rank: int, batch_size: int) -> tuple[int, int]:
    """The global sample range [start, stop) of a node's DP rank."""
    per = batch_size // layout.dp
    return dp_rank * per, (dp_rank + 1) * per


def dp_shard(value: torch.Tensor, layout: Layout, rank: int, batch_size: int) -> torch.Tensor:
    """This rank's samples of a global-batch tensor for a node with ``layout``."""
    start, stop = shard_range(layout, layout.coords(rank)["dp"], batch_size)
    return value[start:stop]
