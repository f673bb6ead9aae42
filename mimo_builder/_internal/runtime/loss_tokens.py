"""Per-token losses: each microbatch's loss counts by its share of the global batch's loss tokens.

A node's ``loss`` output is the mean over the loss tokens of its microbatch shard; its builder's
``loss_tokens`` says how many each sample holds (from the batch: by default the loss mask). The
step's loss is Megatron-Core's ``calculate_per_token_loss`` semantics: the sum over every loss token
of the global batch divided by their count ``N``. So microbatch ``m`` of a DP shard holding ``n`` of
the ``N`` tokens adds ``n / N`` of its mean (its *share*), whatever the microbatch count, DP size,
packing or placement. Its backward runs on ``dp * cp * share * loss``: each node's DDP averages
gradients over its DP x CP group (MCore's default ``gradient_scaling_factor``, ``1 / (dp * cp)``),
and the input gradients sent to other nodes are scaled by ``dp_producer / dp_consumer`` on that
footing (:mod:`~mimo_builder._internal.runtime.schedule`). A shard without loss tokens adds nothing
to the loss; its backward runs at weight 0 (so DDP sees every parameter's gradient), or not at all
where its mean is not finite (``0 / 0`` for some builders): it never makes the step NaN.

``N`` is counted from the whole global batch where every rank holds it; from a rank's share
(:class:`~mimo_builder._internal.runtime.shards.RankBatch`) it is one all-reduce of the shards'
counts over the control group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.runtime.shards import RankBatch
from mimo_builder._internal.validation import ValidGraph


@dataclass(frozen=True)
class LossShares:
    """Each hosted loss node's share of the global batch's loss tokens, per microbatch of this
    rank's shard."""

    shares: dict[str, list[float]]

    def share(self, node: str, m: int) -> float:
        """Microbatch ``m``'s share of ``node``'s loss tokens (0.0: it holds none)."""
        return self.shares[node][m]

    def scale(self, valid: ValidGraph, node: str, m: int) -> float:
        """The factor of microbatch ``m``'s loss in the backward: its share, with DDP's mean over
        the node's DP x CP group undone."""
        layout = valid.layouts[node]
        return self.share(node, m) * layout.dp * layout.cp


def loss_nodes(valid: ValidGraph) -> list[str]:
    """The nodes whose ``loss`` is a graph output, in the graph's output order."""
    return [node for node, port in valid.outputs if port == "loss"]


def global_counts(valid: ValidGraph, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss node's loss tokens in the whole global ``batch`` (every bound key present)."""
    size = len(next(iter(batch.values())))
    return {node: sum(_per_sample(valid, node, batch, size)) for node in loss_nodes(valid)}


def loss_shares(valid: ValidGraph, batch: RankBatch, rank: int, totals: dict[str, float] | None,
                group) -> LossShares:
    """The shares of ``rank``'s microbatch shards. ``totals``: :func:`global_counts` of the global
    batch, or None: summed from every rank's shard (a collective over ``group``, all ranks)."""
    local = {node: _microbatch_counts(valid, node, batch)
             for node in loss_nodes(valid) if rank in valid.layouts[node].ranks}
    if totals is None:
        totals = _summed(valid, local, rank, group)
    return LossShares({node: [n / totals[node] if totals[node] > 0 else 0.0 for n in counts]
                       for node, counts in local.items()})


def _per_sample(valid: ValidGraph, node: str, rows: dict[str, torch.Tensor], samples: int) -> list[float]:
    """The builder's loss-token count of each of ``samples`` rows of ``node``'s batch keys (Python
    floats: sums over a global batch stay exact past float32's 2^24)."""
    inputs = {port: rows[key] for key, (n, port) in valid.inputs.items() if n == node and key in rows}
    builder = valid.builders[node]
    counts = builder.loss_tokens(inputs, samples)
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (samples,):
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise MimoError(f"node '{node}': {type(builder).__name__}.loss_tokens() returned {got}; "
                        f"it must return one count per sample, shape ({samples},)")
    return [float(n) for n in counts.tolist()]


def _microbatch_counts(valid: ValidGraph, node: str, batch: RankBatch) -> list[float]:
    """The loss tokens of this rank's shard of ``node``, per microbatch."""
    samples = batch.size // valid.layouts[node].dp
    counts = _per_sample(valid, node, batch.rows, samples)
    per = samples // batch.num_microbatches
    return [sum(counts[m * per:(m + 1) * per]) for m in range(batch.num_microbatches)]


def _summed(valid: ValidGraph, local: dict[str, list[float]], rank: int, group) -> dict[str, float]:
    """Each loss node's global count: its DP shards' counts summed, each shard counted by its rank
    at TP, CP and PP coordinate 0 (a collective over ``group``, all ranks)."""
    nodes = loss_nodes(valid)
    if not nodes:
        return {}
    sums = torch.zeros(len(nodes), dtype=torch.float64)
    for i, node in enumerate(nodes):
        coords = valid.layouts[node].coords(rank) if node in local else None
        if coords is not None and coords["tp"] == coords["cp"] == coords["pp"] == 0:
            sums[i] = sum(local[node])
    dist.all_reduce(sums, group=group)
    return dict(zip(nodes, sums.tolist()))
