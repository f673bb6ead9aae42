"""Ragged modality inputs: per sample, a list of items (images, clips, frames) of their own sizes.

A batch key bound to an encoder port holds either one stacked tensor (every sample one item of
the port's shape, as before) or :class:`Items`: sample ``i`` holds ``0..N`` tensors, each shaped
as the port without its batch axis (``[C, H, W]`` for an image). Items slice, join and move like
a batch-first tensor, so shards, microbatches and the loader treat both alike.

An encoder that declares the port in ``ModelBuilder.ragged_inputs`` runs the flat list of a
microbatch's items with :func:`run_items`: items of one shape go through the module together (no
padding inside the encoder), and each sample's output tokens are its items' tokens one after
another, padded with zeros to the microbatch's longest sample (``[B, T_max, hidden]``). The
consumer places each sample's first ``n`` rows at its ``n`` placeholders and ignores the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from mimo_builder._internal.assembly.tp_shard import unwrap

from mimo_builder._internal.runtime.balance import ItemExchange, balanced_encode


@dataclass(frozen=True)
class Items:
    """Per sample, the tuple of its items (tensors), in the order its text names them."""

    samples: tuple[tuple[torch.Tensor, ...], ...]
    exchange: ItemExchange | None = field(default=None, compare=False)
    """Set by the runtime on a node that balances its items over its DP ranks (:mod:`.balance`)."""

    @classmethod
    def of(cls, samples: Iterable[Sequence[torch.Tensor]]) -> Items:
        """Items from per-sample sequences of tensors."""
        return cls(tuple(tuple(items) for items in samples))

    @classmethod
    def of_tensor(cls, value: torch.Tensor) -> Items:
        """A stacked batch as items: each row one item."""
        return cls(tuple((row,) for row in value))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: slice) -> Items:
        if not isinstance(index, slice):
            raise TypeError("Items take a slice of samples")
        return Items(self.samples[index])

    @property
    def counts(self) -> list[int]:
        """Items per sample."""
        return [len(items) for items in self.samples]

    def flat(self) -> list[torch.Tensor]:
        """Every item, sample after sample."""
        return [item for items in self.samples for item in items]

    def balanced(self, exchange: ItemExchange | None) -> Items:
        """The same items, encoded where ``exchange`` assigns them (None: each rank its own)."""
        return replace(self, exchange=exchange)

    def to(self, device) -> Items:
        """The items on ``device``."""
        return Items(tuple(tuple(item.to(device) for item in items) for items in self.samples))

    def signature(self) -> tuple:
        """Shapes and dtypes of every item, sample by sample (a batch signature's part)."""
        return tuple(tuple((tuple(item.shape), item.dtype) for item in items) for items in self.samples)


def join_rows(parts: list) -> torch.Tensor | Items:
    """Parts of a batch key one after another along the samples (a lone part as it is). Tensors
    with Items mixed become Items."""
    if len(parts) == 1:
        return parts[0]
    if all(torch.is_tensor(p) for p in parts):
        return torch.cat(parts)
    return Items(tuple(s for p in parts for s in (p.samples if isinstance(p, Items) else Items.of_tensor(p).samples)))


def join_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Activations of several producers along the batch axis; when they differ in their tokens
    axis (ragged items padded per producer), each is padded with zeros to the longest."""
    if len(parts) == 1:
        return parts[0]
    longest = max(p.shape[1] for p in parts) if parts[0].dim() > 2 else None
    if longest is not None and any(p.shape[1] != longest for p in parts):
        parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, longest - p.shape[1])) for p in parts]
    return torch.cat(parts)


def run_items(items: Items, encode: Callable[[torch.Tensor], torch.Tensor], like: torch.nn.Module,
              width: int | None = None) -> torch.Tensor:
    """``encode`` over every item, items of one shape together, as ``[B, T_max, hidden]``: each
    sample's items' tokens in order, then zeros. ``encode`` maps ``[n, *item]`` to ``[n, tokens,
    hidden]``. With an exchange, the items are encoded on the DP ranks it assigns them to. A rank
    that encodes nothing gives every trainable parameter of ``like`` a zero gradient, so
    data-parallel gradient reduction sees them all; without any item the output is ``[B, 0, width]``
    (``width``: the output's features, by default ``like.config.hidden_size``)."""
    flat, link = items.flat(), None
    if items.exchange is not None:
        encoded, worked, link = balanced_encode(flat, lambda some: encode_grouped(some, encode), items.exchange)
    else:
        encoded, worked = encode_grouped(flat, encode), bool(flat)
    per_sample, at = [], 0
    for count in items.counts:
        per_sample.append(encoded[at:at + count])
        at += count
    out = _padded(per_sample, encoded[0]) if flat else _empty(len(items), like, width)
    if not worked:
        out = out + _zero_link(like, out.dtype)
    return out if link is None else out + link


def encode_input(value: "torch.Tensor | Items", encode: Callable[[torch.Tensor], torch.Tensor],
                 model: torch.nn.Module, width: int | None = None) -> torch.Tensor:
    """``encode`` of an encoder port's input: a stacked batch as it is, Items through
    :func:`run_items` (``model``, out of its wrappers, stands for the node; ``width``: its
    output features when it is not ``config.hidden_size``)."""
    if isinstance(value, Items):
        return run_items(value, encode, unwrap(model), width=width)
    return encode(value)


def encode_grouped(flat: list[torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Each item's output (``[tokens, hidden]``), items of one shape and dtype through ``encode`` together."""
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(flat):
        groups.setdefault((tuple(item.shape), item.dtype), []).append(index)
    encoded: list[torch.Tensor | None] = [None] * len(flat)
    for indices in groups.values():
        out = encode(torch.stack([flat[i] for i in indices]))
        for i, row in zip(indices, out.unbind(0)):  # one backward op for the group, not one per row
            encoded[i] = row
    return encoded


def _padded(per_sample: list[list[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    rows = [torch.cat(tokens) if tokens else like.new_zeros((0, like.shape[-1])) for tokens in per_sample]
    longest = max(r.shape[0] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])


def _empty(samples: int, module: torch.nn.Module, width: int | None = None) -> torch.Tensor:
    hidden = width or getattr(getattr(module, "config", None), "hidden_size", None)
    if hidden is None:
        raise ValueError("run_items: a module without config.hidden_size needs at least one item")
    reference = next(module.parameters())
    return torch.zeros((samples, 0, hidden), dtype=reference.dtype, device=reference.device)


def _zero_link(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | float:
    """0 times every trainable parameter: their gradients become zeros (DDP's hooks fire)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return (0.0 * sum(p.sum() for p in params)).to(dtype) if params else 0.0


def ragged_nodes(valid) -> frozenset[str]:
    """Nodes whose outputs may carry ragged tokens: those with a batch-bound port their builder
    takes as :class:`Items`, and every node downstream of one."""
    found = {node for node, port in valid.inputs.values()
             if port in getattr(valid.builders[node], "ragged_inputs", frozenset())}
    for node in valid.order:  # topological: a producer before its consumers
        if any(e.src in found for e in valid.edges if e.dst == node):
            found.add(node)
    return frozenset(found)
