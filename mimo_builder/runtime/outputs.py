"""Graph outputs of a forward-only pass, averaged over the global batch on every rank.

A ``loss`` output is a node's mean over its microbatch shard: the graph's value is the mean
over microbatches and DP ranks (under context parallelism each CP rank holds its part of it).
An output with one value per sample (a port with axes ``("batch",)``, e.g. whether a sample's
answer was right) is averaged over every sample of the global batch; under context parallelism
the node gives each CP rank the whole sample's value. Each value is added once: by the first TP
and CP rank of the last pipeline stage of each DP shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mimo_builder.validation import ValidGraph


def reducible_outputs(valid: ValidGraph) -> list[tuple[str, str]]:
    """The graph outputs :func:`output_means` returns: losses and per-sample values."""
    return [(node, port) for node, port in valid.outputs
            if port == "loss" or valid.ports(node).outputs[port].dims == ("batch",)]


def output_means(valid: ValidGraph, outputs: dict[str, list[dict[str, torch.Tensor]]], rank: int,
                 batch_size: int, group) -> dict[str, float]:
    """``outputs``: this rank's last-stage outputs by node, one dict per microbatch. A collective
    over ``group`` (all ranks)."""
    wanted = reducible_outputs(valid)
    sums = torch.zeros(len(wanted), dtype=torch.float64)
    for i, (node, port) in enumerate(wanted):
        layout = valid.layouts[node]
        coords = layout.coords(rank) if rank in layout.ranks else None
        if node not in outputs or coords["tp"] != 0:
            continue
        values = [microbatch[port].detach().double() for microbatch in outputs[node]]
        if port == "loss":
            sums[i] = sum(float(v) for v in values) / len(values) / layout.dp
        elif coords["cp"] == 0:
            sums[i] = float(sum(v.sum() for v in values)) / batch_size
    dist.all_reduce(sums, group=group)
    return {f"{node}.{port}": float(value) for (node, port), value in zip(wanted, sums)}
