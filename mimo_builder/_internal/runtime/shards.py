"""Which samples of a global batch each rank needs, and a rank's share of a batch.

A global batch of ``B`` samples runs as ``M`` microbatches; each node with data-parallel size
``dp`` gives its DP rank ``d`` samples ``[d * B/M/dp, (d + 1) * B/M/dp)`` of every microbatch.
:class:`BatchLayout` cuts the batch into equal *chunks*, the finest pieces any node's shard is
made of (``K`` = the least common multiple of the DP sizes of nodes the batch feeds, ``M * K``
chunks in all), so a rank reads exactly the chunks of its nodes' shards and nothing else.
:class:`RankBatch` holds them: for each batch key of a node on this rank, the rows of that
node's shard, microbatch after microbatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.runtime.items import join_rows
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.validation import ValidGraph


class ShardError(MimoError, ValueError):
    """A batch cannot be cut the way the graph's placements need; names the sizes."""


@dataclass(frozen=True)
class BatchLayout:
    """A global batch of ``batch_size`` samples in ``num_microbatches``, cut into chunks."""

    batch_size: int
    num_microbatches: int
    chunks_per_microbatch: int

    @classmethod
    def of(cls, valid: ValidGraph, batch_size: int, num_microbatches: int = 1) -> BatchLayout:
        """The layout for ``valid``'s placements; refuses sizes its DP shards cannot split."""
        fed = {node for node, _ in valid.inputs.values()}
        per_microbatch = math.lcm(*(valid.layouts[node].dp for node in fed)) if fed else 1
        if batch_size % (num_microbatches * per_microbatch):
            sizes = ", ".join(f"'{n}' dp={valid.layouts[n].dp}" for n in sorted(fed))
            raise ShardError(f"batch size {batch_size} does not split into {num_microbatches} microbatch(es) "
                             f"of shards for every node the batch feeds ({sizes}): use a multiple of "
                             f"{num_microbatches * per_microbatch}")
        return cls(batch_size, num_microbatches, per_microbatch)

    @property
    def num_chunks(self) -> int:
        """Chunks in the global batch, every microbatch together."""
        return self.num_microbatches * self.chunks_per_microbatch

    @property
    def chunk_size(self) -> int:
        """Samples per chunk."""
        return self.batch_size // self.num_chunks

    def rows(self, chunk: int) -> range:
        """The global batch rows of ``chunk``."""
        return range(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)

    def shard_chunks(self, layout: Layout, rank: int) -> list[int]:
        """The chunks of ``rank``'s shard of a node placed as ``layout``, microbatch after microbatch."""
        per_shard = self.chunks_per_microbatch // layout.dp
        first = layout.coords(rank)["dp"] * per_shard
        return [m * self.chunks_per_microbatch + first + j
                for m in range(self.num_microbatches) for j in range(per_shard)]

    def key_chunks(self, valid: ValidGraph, rank: int) -> dict[str, list[int]]:
        """For each batch key of a node ``rank`` hosts, the chunks of that node's shard."""
        return {key: self.shard_chunks(valid.layouts[node], rank)
                for key, (node, _) in valid.inputs.items() if rank in valid.layouts[node].ranks}

    def needed_chunks(self, valid: ValidGraph, rank: int) -> list[int]:
        """Every chunk ``rank`` reads (each once), in order."""
        return sorted({c for chunks in self.key_chunks(valid, rank).values() for c in chunks})


@dataclass
class RankBatch:
    """This rank's share of one global batch: ``rows[key]`` are the rows of the key's node shard,
    microbatch after microbatch (keys of nodes on other ranks are absent)."""

    size: int
    """The global batch size."""
    num_microbatches: int
    rows: dict[str, torch.Tensor]

    def microbatch(self, key: str, m: int) -> torch.Tensor:
        """The rows of ``key`` in microbatch ``m``."""
        value = self.rows[key]
        per = len(value) // self.num_microbatches
        return value[m * per:(m + 1) * per]

    @classmethod
    def from_global(cls, valid: ValidGraph, batch: dict[str, torch.Tensor], rank: int,
                    num_microbatches: int) -> RankBatch:
        """Cut ``rank``'s share out of a whole global batch (every key present)."""
        size = len(next(iter(batch.values())))
        layout = BatchLayout.of(valid, size, num_microbatches)
        return cls(size, num_microbatches, {key: joined([batch[key][layout.rows(c).start:layout.rows(c).stop]
                                                         for c in chunks])
                                            for key, chunks in layout.key_chunks(valid, rank).items()})

    @classmethod
    def from_chunks(cls, valid: ValidGraph, layout: BatchLayout, rank: int,
                    chunks: dict[int, dict[str, torch.Tensor]]) -> RankBatch:
        """Assemble ``rank``'s share from its collated chunks (``chunk -> {key: rows}``)."""
        return cls(layout.batch_size, layout.num_microbatches,
                   {key: joined([chunks[c][key] for c in needed])
                    for key, needed in layout.key_chunks(valid, rank).items()})


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts one after another along the batch axis (a lone part as it is, no copy); ragged
    :class:`~mimo_builder._internal.runtime.items.Items` among them join as Items."""
    if len(parts) == 1:
        return parts[0]
    if all(torch.is_tensor(p) for p in parts):
        return torch.cat(parts)
    return join_rows(parts)
