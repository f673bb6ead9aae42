"""Graph outputs of a forward-only pass, averaged over the global batch on every rank.

A ``loss`` output is a node's mean over the loss tokens of its microbatch shard: the graph's value
is the mean over every loss token of the global batch, each microbatch shard's mean weighed by its
share of them (:mod:`~mimo_builder._internal.runtime.loss_tokens`; under context parallelism each
CP rank holds its part of its shard's mean).
An output with one value per sample (a port with axes ``("batch",)``, e.g. whether a sample's
answer was right) is averaged over every sample of the global batch; under context parallelism
the node gives each CP rank the whole sample's value. Each value is added once: by the first TP
and CP rank of the last pipeline stage of each DP shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.runtime.loss_tokens import LossShares

from mimo_builder._internal.runtime.items import join_padded
from mimo_builder._internal.validation import ValidGraph


def reducible_outputs(valid: ValidGraph) -> list[tuple[str, str]]:
    """The graph outputs :func:`output_means` returns: losses and per-sample values."""
    return [(node, port) for node, port in valid.outputs
            if port == "loss" or valid.ports(node).outputs[port].dims == ("batch",)]


def output_means(valid: ValidGraph, outputs: dict[str, list[dict[str, torch.Tensor]]], rank: int,
                 batch_size: int, shares: LossShares, group) -> dict[str, float]:
    """``outputs``: this rank's last-stage outputs by node, one dict per microbatch; ``shares``: each
    microbatch's share of a loss's tokens. A collective over ``group`` (all ranks)."""
    wanted = reducible_outputs(valid)
    sums = torch.zeros(2, len(wanted), dtype=torch.float64)  # the sums, and how many ranks had the value
    for i, (node, port) in enumerate(wanted):
        layout = valid.layouts[node]
        coords = layout.coords(rank) if rank in layout.ranks else None
        if node not in outputs or coords["tp"] != 0 or any(port not in mb for mb in outputs[node]):
            continue  # (an output a node gives in some passes only: a loss needs labels)
        sums[1, i] = 1
        values = [microbatch[port].detach().double() for microbatch in outputs[node]]
        if port == "loss":
            sums[0, i] = sum(float(v) * shares.share(node, m) for m, v in enumerate(values) if shares.share(node, m))
        elif coords["cp"] == 0:
            sums[0, i] = float(sum(v.sum() for v in values)) / batch_size
    dist.all_reduce(sums, group=group)
    return {f"{node}.{port}": float(value) for (node, port), value, had in zip(wanted, sums[0], sums[1]) if had}


def check_requested(valid: ValidGraph, refs: list[str]) -> list[tuple[str, str]]:
    """``node.port`` references of batch-first output ports a forward-only pass can return whole;
    ConfigError naming the reference otherwise."""
    from mimo_builder._internal.document.graph import parse_port_ref
    from mimo_builder._internal.errors import ConfigError

    wanted = []
    for ref in refs:
        try:
            node, port = parse_port_ref(ref)
        except ValueError as err:
            raise ConfigError(f"outputs: {err}") from None
        if node not in valid.layouts or port not in valid.ports(node).outputs:
            ports = ", ".join(sorted(valid.ports(node).outputs)) if node in valid.layouts else "no such node"
            raise ConfigError(f"outputs: {ref!r} is not an output port ({node}: {ports})")
        if port == "loss" or valid.ports(node).outputs[port].dims[:1] != ("batch",):
            raise ConfigError(f"outputs: {ref!r} has no batch axis (a loss is in evaluate()'s means)")
        if valid.layouts[node].cp > 1:
            raise ConfigError(f"outputs: node '{node}' splits its tokens over cp={valid.layouts[node].cp}; "
                              "read its outputs at cp=1")
        wanted.append((node, port))
    return wanted


def gathered_outputs(valid: ValidGraph, outputs: dict[str, list[dict[str, torch.Tensor]]], wanted, rank: int,
                     per: int, group) -> dict[str, torch.Tensor]:
    """Each ``wanted`` port's tensor for the whole batch, on global rank 0 ({} elsewhere): every
    DP shard of every microbatch in order, a TP-split last axis (vocabulary-parallel logits)
    joined and cut to the port's size. A collective over ``group`` (all ranks) unless nothing is wanted."""
    if not wanted:
        return {}
    pieces = []
    for node, port in wanted:
        layout = valid.layouts[node]
        if node not in outputs:
            continue
        coords, features = layout.coords(rank), valid.ports(node).outputs[port].features
        for m, microbatch in enumerate(outputs[node]):
            if port not in microbatch:
                raise MimoError(f"outputs: node '{node}' returned {sorted(microbatch)} in this pass, not '{port}' "
                                "(a language model returns its logits for a batch without labels)")
            value = microbatch[port].detach()
            split = features is not None and layout.tp > 1 and value.shape[-1] < features
            if split or coords["tp"] == 0:
                start = m * per + coords["dp"] * (per // layout.dp)
                pieces.append((f"{node}.{port}", start, coords["tp"] if split else 0, features if split else None,
                               value.cpu()))
    gathered = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(pieces, gathered, dst=0, group=group)
    return _assembled([p for part in gathered for p in part]) if rank == 0 else {}


def _assembled(pieces) -> dict[str, torch.Tensor]:
    rows: dict[str, dict[int, dict[int, tuple]]] = {}
    for ref, start, tp, features, value in pieces:
        rows.setdefault(ref, {}).setdefault(start, {})[tp] = (features, value)
    out = {}
    for ref, by_start in rows.items():
        blocks = []
        for start in sorted(by_start):
            parts = [by_start[start][tp] for tp in sorted(by_start[start])]
            features = parts[0][0]
            block = torch.cat([value for _, value in parts], dim=-1)
            blocks.append(block[..., :features] if features is not None else block)
        out[ref] = join_padded(blocks)  # ragged items' tokens: each shard padded to its own longest
    return out


def global_loss(valid: ValidGraph, local: dict[str, float], rank: int, group) -> float:
    """Sum over loss nodes of each node's mean over the global batch's loss tokens, on every rank.
    ``local``: this rank's loss terms by node, each microbatch's mean times its share (under
    context parallelism each CP rank holds its part of it). A collective over ``group``."""
    value = torch.zeros(1, dtype=torch.float64)
    for node, loss in local.items():
        if valid.layouts[node].coords(rank)["tp"] == 0:
            value += loss
    dist.all_reduce(value, group=group)
    return float(value)
