"""Encoder load balance: a microbatch's items spread over the encoder's data-parallel ranks by cost.

By sample, DP rank ``d`` encodes the items of its own samples, so the rank whose samples hold
twelve images works while the one with a text-only shard waits. Balanced, every rank learns the
shapes of every rank's items (two small all-gathers), all assign them the same way (each
rank keeps its own up to the mean load, the rest go costliest first to the least loaded rank:
:func:`assign`), the pixels travel
to the ranks that encode them and the embeddings back to the ranks that own their samples (two
all-to-alls; the second carries the gradients back in the backward). Each rank then holds its own
samples' embeddings exactly as by sample: only the ranks doing the arithmetic changed, so the
loss, gradients and updates are the same up to float32 summation order.

The cost of an item of ``t`` tokens is ``t * (t + 6 * hidden)``: a transformer layer's linears
(``12 t h^2`` FLOPs) and attention (``2 t^2 h``), divided by ``2 h``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ItemExchange:
    """How a node balances its ragged items: its data-parallel ``group`` and each item's token
    count (``tokens(shape)``), from which its cost follows."""

    group: object
    tokens: Callable[[tuple[int, ...]], int]
    hidden: int
    device: torch.device = torch.device("cpu")
    """Where the group's collectives run (the node's device)."""

    def cost(self, shape: tuple[int, ...]) -> int:
        """The relative cost of encoding one item of ``shape``."""
        t = self.tokens(shape)
        return t * (t + 6 * self.hidden)


def balancing_ports(valid) -> dict[str, list[str]]:
    """The nodes that balance their items (``balance_items``, DP above 1) and their batch-bound
    ports that their builder takes as items: the same on every rank."""
    out: dict[str, list[str]] = {}
    for node, port in valid.inputs.values():
        builder, layout = valid.builders[node], valid.layouts[node]
        if (layout.dp > 1 and valid.graph.nodes[node].balance_items
                and port in getattr(builder, "ragged_inputs", frozenset())):
            out.setdefault(node, []).append(port)
    return out


def node_exchanges(model, groups: dict, device: torch.device) -> dict[str, dict[str, ItemExchange]]:
    """For each node on this rank that balances its items (:func:`balancing_ports`), the exchange
    of each such port over its layout's DP group in ``groups`` (layout -> group: the schedule's own
    copies, which a failing rank drops to wake its peers)."""
    valid, out = model.valid, {}
    for node, ports in balancing_ports(valid).items():
        if not model.hosts(node):
            continue
        builder = valid.builders[node]
        hidden = getattr(builder.config, "output_width", None) or getattr(builder.config, "hidden_size", 1)
        group = groups[valid.layouts[node]]
        out[node] = {port: ItemExchange(group, _port_tokens(builder, port), hidden, device) for port in ports}
    return out


def _port_tokens(builder, port: str) -> Callable[[tuple[int, ...]], int]:
    return lambda shape: sum(builder.item_tokens(port, shape).values())


def assign(costs: list[list[int]]) -> list[list[int]]:
    """For each rank's items (``costs[r][i]``), the rank that encodes it; the same answer on every
    rank. Each rank keeps its own items, costliest first, while its load stays within the mean
    (and always its costliest); the rest go costliest first to the least loaded rank (a tie to the
    item's own rank, then the lowest). Items already balanced stay where they are."""
    size = len(costs)
    mean = sum(map(sum, costs)) / max(size, 1)
    load, where, rest = [0] * size, [[0] * len(items) for items in costs], []
    for rank, items in enumerate(costs):
        for index in sorted(range(len(items)), key=lambda i: (-items[i], i)):
            if load[rank] == 0 or load[rank] + items[index] <= mean:
                where[rank][index], load[rank] = rank, load[rank] + items[index]
            else:
                rest.append((items[index], rank, index))
    for cost, owner, index in sorted(rest, key=lambda x: (-x[0], x[1], x[2])):
        least = min(load)
        target = owner if load[owner] == least else load.index(least)
        where[owner][index] = target
        load[target] += cost
    return where


def balanced_encode(flat: list[torch.Tensor], encode_all: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                    exchange: ItemExchange) -> tuple[list[torch.Tensor], bool, torch.Tensor]:
    """This rank's items' outputs (``[tokens, hidden]`` each, in order), encoded wherever
    :func:`assign` puts them; ``encode_all`` encodes a list of items. Also whether this rank
    encoded anything itself, and a zero to add to what the rank returns: it ties the returning
    all-to-all into every rank's backward (a collective that every rank of the group must join,
    also one that owns no item)."""
    group = exchange.group
    me, size = dist.get_rank(group), dist.get_world_size(group)
    shapes = _all_shapes(flat, group, size, exchange.device)
    where = assign([[exchange.cost(s) for s in rank_shapes] for rank_shapes in shapes])
    mine = [(r, i) for r in range(size) for i, target in enumerate(where[r]) if target == me]
    received = _exchange_items(flat, shapes, where, mine, me, group, exchange.device)
    outputs = encode_all(received) if received else []
    back, got = _return_outputs(outputs, mine, where, me, size, group, flat, exchange)
    return back, bool(received), got[:0].sum()


def _all_shapes(flat: list[torch.Tensor], group, size: int, device) -> list[list[tuple[int, ...]]]:
    """Every rank's item shapes, in its order (two all-gathers of integers)."""
    axes = flat[0].dim() if flat else 0
    counts = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([len(flat), axes], device=device), group=group)
    counts = [c.tolist() for c in counts]
    most, axes = max(c[0] for c in counts), max(c[1] for c in counts)
    mine = torch.zeros((most, axes), dtype=torch.int64)
    for i, item in enumerate(flat):
        mine[i] = torch.tensor(item.shape)
    every = [torch.empty((most, axes), dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(every, mine.to(device), group=group)
    return [[tuple(row) for row in every[r][:counts[r][0]].tolist()] for r in range(size)]


def _exchange_items(flat, shapes, where, mine, me: int, group, device) -> list[torch.Tensor]:
    """The items this rank encodes (``mine``: (owner, index) in order), their pixels sent over."""
    size = len(shapes)
    send = [[flat[i] for i in range(len(flat)) if where[me][i] == d] for d in range(size)]
    send_sizes = [sum(t.numel() for t in part) for part in send]
    recv_sizes = [sum(math.prod(shapes[r][i]) for r2, i in mine if r2 == r) for r in range(size)]
    buffer = torch.cat([t.reshape(-1).float() for part in send for t in part]) if any(send_sizes) \
        else torch.empty(0, device=device)
    out = torch.empty(sum(recv_sizes), device=device)  # float32 on every rank, whatever the items' dtype
    dist.all_to_all_single(out, buffer, recv_sizes, send_sizes, group=group)
    items, at = [], 0
    for r, i in mine:
        n = math.prod(shapes[r][i])
        items.append(out[at:at + n].reshape(shapes[r][i]))
        at += n
    return items


def _return_outputs(outputs, mine, where, me: int, size: int, group, flat, exchange):
    """Each encoded item's output back to its owner (in float32, cast back to the encoder's
    dtype: a rank that owns items encodes some itself, see :func:`assign`); this rank's own
    items' outputs in order, and the received buffer."""
    hidden = exchange.hidden
    tokens = [exchange.tokens(tuple(t.shape)) for t in flat]
    by_owner = [[o for (r, _), o in zip(mine, outputs) if r == d] for d in range(size)]
    send_sizes = [sum(o.numel() for o in part) for part in by_owner]
    recv_sizes = [hidden * sum(tokens[i] for i in range(len(flat)) if where[me][i] == p) for p in range(size)]
    dtype = outputs[0].dtype if outputs else torch.float32
    buffer = torch.cat([o.reshape(-1) for part in by_owner for o in part]).float() if outputs \
        else torch.zeros(0, device=exchange.device, requires_grad=torch.is_grad_enabled())
    got = AllToAll.apply(buffer, recv_sizes, send_sizes, group)
    order = [i for p in range(size) for i in range(len(flat)) if where[me][i] == p]  # as they arrive
    # one split (one backward op), not a slice per item: each slice's backward fills a whole buffer
    parts = got.split([tokens[i] * hidden for i in order])
    pieces = {i: part.reshape(tokens[i], hidden).to(dtype) for i, part in zip(order, parts)}
    return [pieces[i] for i in range(len(flat))], got


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, buffer, recv_sizes, send_sizes, group):
        """``buffer``'s parts (``send_sizes`` elements per rank) out; ``recv_sizes`` from each rank in."""
        ctx.sizes, ctx.group = (recv_sizes, send_sizes), group
        out = buffer.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, buffer.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        """The gradient's parts back to the ranks they came from."""
        recv_sizes, send_sizes = ctx.sizes
        out = grad.new_empty(sum(send_sizes))
        dist.all_to_all_single(out, grad.contiguous(), send_sizes, recv_sizes, group=ctx.group)
        return out, None, None, None
