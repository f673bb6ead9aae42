"""Check a global batch against the graph's bound input ports, and cut each node's DP shard.

Every rank holds the same global batch; a node with data-parallel size ``dp`` gives its DP
rank ``i`` samples ``[i * B/dp, (i + 1) * B/dp)``. The checks are pure and deterministic, so a
bad batch raises the same error on every rank before any communication. Each bound tensor is
checked against its port's axes and declared dtype (one pass per tensor: min/max of integer
ids against their bound, finiteness of floating values).
"""

from __future__ import annotations

import torch

from mimo_builder._internal.kinds.builder import Port
from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.runtime.items import Items
from mimo_builder._internal.kinds.transformer import DTYPES
from mimo_builder._internal.validation import ValidGraph

INT_DTYPES = (torch.int64, torch.int32)


class BatchError(MimoError, ValueError):
    """The batch does not fit the graph's inputs; names the key and the port."""


def check_batch(valid: ValidGraph, batch: dict[str, torch.Tensor]) -> int:
    """Return the global batch size, or raise BatchError listing every problem."""
    problems, sizes = _tensor_problems(valid, batch, valid.inputs)
    if len(set(sizes.values())) > 1:
        problems.append(f"batch keys disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()), 0)
    for name, layout in valid.layouts.items():
        if sizes and size % layout.dp:
            problems.append(f"batch size {size} is not divisible by node '{name}' data-parallel size {layout.dp}")
    _raise(problems)
    return size


def tensor_problems(valid: ValidGraph, batch: dict[str, torch.Tensor]) -> list[str]:
    """Problems of each bound tensor of ``batch`` against its port (axes, dtype, id range,
    finiteness), without the checks of its size: what a collated chunk of samples must pass."""
    return _tensor_problems(valid, batch, valid.inputs)[0]


def split_problems(valid: ValidGraph, size: int, num_microbatches: int) -> list[str]:
    """Why a ``size``-sample batch does not split into ``num_microbatches`` microbatches that
    every node's data-parallel size divides (empty when it does)."""
    if num_microbatches < 1 or size % num_microbatches:
        return [f"batch size {size} is not divisible by {num_microbatches} microbatch(es)"]
    per = size // num_microbatches
    return [f"microbatch size {per} (batch size {size} / {num_microbatches} microbatches) is not divisible by "
            f"node '{name}' data-parallel size {layout.dp}" for name, layout in valid.layouts.items() if per % layout.dp]


def check_split(valid: ValidGraph, size: int, num_microbatches: int) -> int:
    """Samples per microbatch; BatchError with :func:`split_problems` when the batch does not split."""
    _raise(split_problems(valid, size, num_microbatches))
    return size // num_microbatches


def check_rank_batch(valid: ValidGraph, batch, rank: int, num_microbatches: int) -> int:
    """The same checks on a rank's share (a RankBatch): every key of the nodes on ``rank``, each
    with its node's shard of every microbatch. Returns the global batch size."""
    keys = {key: ref for key, ref in valid.inputs.items() if rank in valid.layouts[ref[0]].ranks}
    problems, sizes = _tensor_problems(valid, batch.rows, keys)
    if batch.num_microbatches != num_microbatches:
        problems.append(f"the batch was cut into {batch.num_microbatches} microbatch(es), the step runs "
                        f"{num_microbatches}")
    for key, rows in sizes.items():
        node = keys[key][0]
        expected = batch.size // valid.layouts[node].dp
        if rows != expected:
            problems.append(f"batch[{key!r}] holds {rows} rows; node '{node}' (dp={valid.layouts[node].dp}) "
                            f"takes {expected} of a global batch of {batch.size}")
    _raise(problems)
    return batch.size


def _tensor_problems(valid: ValidGraph, batch: dict, keys: dict[str, tuple[str, str]]):
    """Problems of each bound tensor against its port, and each tensor's first-axis size."""
    problems, sizes = [], {}
    for key, (node, port_name) in keys.items():
        port = valid.ports(node).inputs[port_name]
        if key not in batch:  # a binding promises the key, even for an optional port
            problems.append(f"batch has no {key!r}, which the graph binds to {node}.{port_name}")
            continue
        value, where = batch[key], f"batch[{key!r}] for {node}.{port_name}"
        if isinstance(value, Items):
            problems += _items_problems(valid, node, port, where, value)
            sizes[key] = len(value)
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != len(port.dims):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{where} must have {len(port.dims)} axes {port.dims}, got {got}")
            continue
        problems += _shape_problems(where, port, value)
        problems += _value_problems(where, port, value, _float_dtypes(valid, node))
        sizes[key] = value.shape[0]
    problems += _like_problems(valid, batch, sizes)
    return problems, sizes


def _items_problems(valid: ValidGraph, node: str, port: Port, where: str, items: Items) -> list[str]:
    """Ragged items: a port its builder takes as items, each item a tensor of the port's axes
    without the batch, of an accepted dtype and finite, of a size the builder takes."""
    builder = valid.builders[node]
    if port.name not in getattr(builder, "ragged_inputs", frozenset()):
        return [f"{where}: node '{node}' takes one item of the port's shape per sample; its builder "
                f"({type(builder).__name__}) does not take lists of items of their own sizes on '{port.name}'"]
    for sample, values in enumerate(items.samples):
        for index, item in enumerate(values):
            at = f"{where}, sample {sample} item {index}"
            if not isinstance(item, torch.Tensor) or item.dim() != len(port.dims) - 1:
                got = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                return [f"{at} must have {len(port.dims) - 1} axes {port.dims[1:]}, got {got}"]
            problems = _value_problems(at, port, item, _float_dtypes(valid, node))
            try:
                builder.item_tokens(port.name, tuple(item.shape))
            except (ValueError, MimoError) as err:
                problems.append(f"{at}: {err}")
            if problems:
                return problems
    return []


def _raise(problems: list[str]) -> None:
    if problems:
        raise BatchError("bad batch:\n" + "\n".join(f"  - {p}" for p in problems))


def _shape_problems(where: str, port: Port, value: torch.Tensor) -> list[str]:
    if port.features is not None and port.dims[-1] not in ("tokens",) and value.shape[-1] != port.features:
        return [f"{where}: last axis ({port.dims[-1]}) must be {port.features}, got {value.shape[-1]}"]
    if port.shape is not None:
        wrong = [f"{d}={n} (expected {e})" for d, n, e in zip(port.dims, value.shape, port.shape)
                 if e is not None and n != e]
        if wrong:
            return [f"{where}: {', '.join(wrong)}"]
    return []


def _value_problems(where: str, port: Port, value: torch.Tensor, floats: tuple[torch.dtype, ...]) -> list[str]:
    """The port's dtype contract: integer ids within [0, high), finite floats of an accepted dtype."""
    if port.dtype == "int":
        if value.dtype not in INT_DTYPES:
            return [f"{where}: expected integer ids ({_names(INT_DTYPES)}), found {value.dtype}"]
        return _range_problems(where, port, value)
    if port.dtype == "number" and value.dtype.is_complex:
        return [f"{where}: expected a bool, integer or floating tensor, found {value.dtype}"]
    if port.dtype == "float" and value.dtype not in floats:
        return [f"{where}: expected a floating tensor ({_names(floats)}), found {value.dtype}"]
    if value.dtype.is_floating_point:
        bad = value.numel() - int(torch.isfinite(value).sum())
        if bad:
            return [f"{where}: {bad} of {value.numel()} values are not finite (nan or inf)"]
    return []


def _range_problems(where: str, port: Port, value: torch.Tensor) -> list[str]:
    if value.numel() == 0:
        return []
    low, high = (int(v) for v in torch.aminmax(value))
    if low >= 0 and (port.high is None or high < port.high):
        return []
    bound = f"[0, {port.high})" if port.high is not None else ">= 0"
    doc = f" ({port.doc})" if port.doc else ""
    return [f"{where}: values must be {bound}{doc}, found min {low}, max {high}"]


def _like_problems(valid: ValidGraph, batch: dict[str, torch.Tensor], checked: dict[str, int]) -> list[str]:
    """Ports declared ``like`` another port of the same node must match its shape."""
    keys = {(node, port): key for key, (node, port) in valid.inputs.items()
            if key in checked and not isinstance(batch[key], Items)}
    problems = []
    for (node, port_name), key in keys.items():
        other = keys.get((node, valid.ports(node).inputs[port_name].like))
        if other is not None and batch[key].shape != batch[other].shape:
            problems.append(f"batch[{key!r}] for {node}.{port_name}: shape {tuple(batch[key].shape)} must equal "
                            f"batch[{other!r}]'s {tuple(batch[other].shape)}")
    return problems


def _float_dtypes(valid: ValidGraph, node: str) -> tuple[torch.dtype, ...]:
    """float32 (mixed-precision wrappers cast it) and the node's own parameter dtype."""
    own = DTYPES.get(getattr(valid.configs[node], "dtype", "fp32"), torch.float32)
    return (torch.float32,) if own == torch.float32 else (torch.float32, own)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d) for d in dtypes)


def shard_range(layout: Layout, dp_rank: int, batch_size: int) -> tuple[int, int]:
    """The global sample range [start, stop) of a node's DP rank."""
    per = batch_size // layout.dp
    return dp_rank * per, (dp_rank + 1) * per
