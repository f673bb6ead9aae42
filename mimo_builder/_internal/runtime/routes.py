"""Every message of a pipelined step: links between stages, their transfers, each channel's order.

A :class:`Link` joins two stages: a graph edge (the producer's last stage to the consumer's
first) or the hidden states from one stage of a node to its next. Its transfers are the bridge's
(:func:`~mimo_builder._internal.runtime.bridge.edge_transfers`: DP shards matched by sample position,
producer TP rank 0 to consumer TP rank 0) or, inside a node, rank to rank at equal TP/CP/DP
coordinates. A message is ``(kind, link, microbatch, transfer)``; activations go forward,
gradients back. :meth:`Routes.sends` and :meth:`Routes.receives` list an operation's messages in
one fixed order, and :attr:`Routes.channel_order` lists, per (source, destination) rank pair,
the order in which the source sends: receivers take messages in that order, so that point-to-point
matching never depends on tags (NCCL has none).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

from mimo_builder._internal.placement import Layout
from mimo_builder._internal.runtime.batch import shard_range
from mimo_builder._internal.runtime.bridge import Transfer, edge_transfers
from mimo_builder._internal.runtime.pipeline import FORWARD, Op, PipelinePlan, Stage
from mimo_builder._internal.validation import Edge

ACTIVATION, GRADIENT = "act", "grad"
Key = tuple[str, int, int, int]  # (kind, link index, microbatch, transfer index)


@dataclass(frozen=True)
class Link:
    """Activations from ``src`` to ``dst``: a graph edge, or (``edge`` None) a node's hidden states."""

    src: Stage
    dst: Stage
    edge: Edge | None = None


def stage_transfers(layout: Layout, src_pp: int, dst_pp: int, batch_size: int) -> list[Transfer]:
    """Inside a node: each rank sends its whole microbatch shard to the rank at the same TP, CP
    and DP coordinates on the next pipeline rank (MCore's P2P pattern)."""
    out = []
    for dp in range(layout.dp):
        start, stop = shard_range(layout, dp, batch_size)
        for cp in range(layout.cp):
            for tp in range(layout.tp):
                out.append(Transfer(layout.rank_of(tp, cp, dp, src_pp), layout.rank_of(tp, cp, dp, dst_pp),
                                    start, stop))
    return out


class Routes:
    """The links, transfers and channel orders of one plan at one microbatch size."""

    def __init__(self, plan: PipelinePlan, edges: list[Edge], layouts: dict[str, Layout],
                 needs_grad: dict[str, bool], batch_size: int):
        self.links = _links(plan, edges)
        self.needs_grad = needs_grad
        self.transfers = [self._transfers(link, layouts, batch_size) for link in self.links]
        self.in_links: dict[Stage, list[int]] = defaultdict(list)
        self.out_links: dict[Stage, list[int]] = defaultdict(list)
        for i, link in enumerate(self.links):
            self.out_links[link.src].append(i)
            self.in_links[link.dst].append(i)
        self.channel_order: dict[tuple[int, int], list[Key]] = defaultdict(list)
        for rank, ops in plan.order.items():
            for op in ops:
                for key, transfer in self.sends(op, rank):
                    dst = transfer.dst if key[0] == ACTIVATION else transfer.src
                    if dst != rank:
                        self.channel_order[(rank, dst)].append(key)

    @staticmethod
    def _transfers(link: Link, layouts: dict[str, Layout], batch_size: int) -> list[Transfer]:
        if link.edge is not None:
            return edge_transfers(layouts[link.src.node], layouts[link.dst.node], batch_size)
        return stage_transfers(layouts[link.src.node], link.src.pp_rank, link.dst.pp_rank, batch_size)

    def sends(self, op: Op, rank: int) -> Iterator[tuple[Key, Transfer]]:
        """What ``op`` sends from ``rank``: activations after a forward, gradients after a backward."""
        if op.kind == FORWARD:
            for li in self.out_links[op.stage]:
                for ti, t in enumerate(self.transfers[li]):
                    if t.src == rank:
                        yield (ACTIVATION, li, op.microbatch, ti), t
        else:
            for li in self.in_links[op.stage]:
                if self.needs_grad[self.links[li].src.node]:
                    for ti, t in enumerate(self.transfers[li]):
                        if t.dst == rank:
                            yield (GRADIENT, li, op.microbatch, ti), t

    def receives(self, op: Op, rank: int, li: int) -> Iterator[tuple[Key, Transfer]]:
        """What ``op`` on ``rank`` receives over link ``li`` (activations in, gradients back)."""
        if op.kind == FORWARD:
            for ti, t in enumerate(self.transfers[li]):
                if t.dst == rank:
                    yield (ACTIVATION, li, op.microbatch, ti), t
        elif self.needs_grad[op.stage.node]:
            for ti, t in enumerate(self.transfers[li]):
                if t.src == rank:
                    yield (GRADIENT, li, op.microbatch, ti), t


def _links(plan: PipelinePlan, edges: list[Edge]) -> list[Link]:
    first = {s.node: s for s in plan.stages if s.index == 0}
    last = {s.node: s for s in plan.stages if s.last}
    links = [Link(a, b) for a in plan.stages for b in plan.succs[a] if a.node == b.node]
    links += [Link(last[e.src], first[e.dst], e) for e in sorted(edges, key=str)]
    return links
