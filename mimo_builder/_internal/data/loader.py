"""Per-rank loading: each rank reads only the chunks of its nodes' data-parallel shards.

A *source* says which samples make chunk ``c`` of step ``s`` (:class:`IndexedSource` for any
map-style dataset; ``mimo_builder._internal.data.energon`` for Megatron-Energon); every rank asks the
same question and gets the same answer, so no rank reads more than its share and no data moves
between ranks. :class:`RankLoader` reads the chunks in DataLoader workers, collates each
(:class:`~mimo_builder._internal.data.collate.GraphCollator`) and hands the train loop one
:class:`~mimo_builder._internal.runtime.shards.RankBatch` per step.
"""

from __future__ import annotations

import multiprocessing
from typing import Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from mimo_builder._internal.data.collate import DataError, GraphCollator
from mimo_builder._internal.platform.cpu_rng import offset_seed
from mimo_builder._internal.runtime.shards import BatchLayout, RankBatch
from mimo_builder._internal.validation import ValidGraph


class SampleSource(Protocol):
    """Where samples come from: the same chunk of the same step gives the same samples on every rank."""

    def samples(self, step: int, chunk: int, layout: BatchLayout) -> list[dict]:
        """The ``layout.chunk_size`` samples of ``chunk`` in global batch ``step`` (1-based)."""
        ...


class IndexedSource:
    """A map-style dataset (``len`` and ``[i]``) in a seeded order: a fresh permutation per epoch
    (or the dataset's order with ``shuffle=False``). Step ``s`` takes the samples at stream
    positions ``[(s - 1) * B, s * B)``, so a run resumed at a step reads what it would have read."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._orders: dict[int, torch.Tensor] = {}

    def samples(self, step: int, chunk: int, layout: BatchLayout) -> list[dict]:
        """The ``layout.chunk_size`` samples of ``chunk`` in global batch ``step`` (1-based), in the
        seeded order; a DataError names the dataset item whose reading failed."""
        return [self._read(index) for index in self.indices(step, chunk, layout)]

    def indices(self, step: int, chunk: int, layout: BatchLayout) -> list[int]:
        """The dataset indices of those samples."""
        start = (step - 1) * layout.batch_size + layout.rows(chunk).start
        return [self._index(position) for position in range(start, start + layout.chunk_size)]

    def _read(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except Exception as err:  # the user's dataset: named by its index, not a traceback
            raise DataError(f"dataset item {index}: reading it raised {type(err).__name__}: {err}") from None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(offset_seed(self.seed, epoch))
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=generator)}
        return int(self._orders[epoch][offset])


class RankLoader:
    """One :class:`RankBatch` per step from ``first_step`` to ``last_step`` for ``rank``.

    ``num_workers`` DataLoader workers read and collate chunks ahead of the train loop (0: in
    this process). A source with ``sequential = True`` (a stream) is read in this process.
    """

    def __init__(self, valid: ValidGraph, source: SampleSource, collate, batch_size: int, rank: int, *,
                 num_microbatches: int = 1, first_step: int = 1, last_step: int, num_workers: int = 0):
        self.valid, self.rank, self.source = valid, rank, source
        self.layout = BatchLayout.of(valid, batch_size, num_microbatches)
        self.chunks = self.layout.needed_chunks(valid, rank)
        self.steps = range(first_step, last_step + 1)
        reads = _ChunkReads(source, collate, self.layout, [(s, c) for s in self.steps for c in self.chunks])
        workers = 0 if getattr(source, "sequential", False) else num_workers
        # forked workers share the rank's dataset and imports (a spawned one would import the
        # dataset's module again, which may live outside sys.path, under an allowed root)
        context = multiprocessing.get_context("fork") if workers and _can_fork() else None
        self._loader = DataLoader(reads, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                  multiprocessing_context=context, prefetch_factor=4 if workers else None)

    def states(self) -> dict[int, dict]:
        """The source's state of each chunk this rank is the first to read (a stream that can
        resume, like energon's; {} for a source that needs none): what a checkpoint keeps."""
        if not hasattr(self.source, "state"):
            return {}
        found = {c: self.source.state(c) for c in self._first_readers()}
        return {c: state for c, state in found.items() if state is not None}

    def restore(self, states: dict[int, dict]) -> None:
        """Continue each of this rank's chunks from its saved state (before iterating)."""
        for chunk in self.chunks:
            if chunk in states:
                self.source.restore(chunk, self.layout, states[chunk])

    def _first_readers(self) -> list[int]:
        """This rank's chunks that no lower rank reads."""
        lower = {c for r in range(self.rank) for c in self.layout.needed_chunks(self.valid, r)}
        return [c for c in self.chunks if c not in lower]

    def __iter__(self) -> Iterator[tuple[int, RankBatch]]:
        reads = iter(self._loader)
        for step in self.steps:
            chunks = {}
            for _ in self.chunks:
                read_step, chunk, batch = next(reads)
                assert read_step == step, (read_step, step)
                if isinstance(batch, DataError):  # found in a worker: raised here, like a sample checked before launch
                    raise batch
                chunks[chunk] = batch
            yield step, RankBatch.from_chunks(self.valid, self.layout, self.rank, chunks)


class _ChunkReads(Dataset):
    """Item ``i``: (step, chunk, the chunk's collated batch, or the DataError of a sample that does
    not fit). The error is returned, not raised: a DataLoader worker's exception comes back to the
    rank wrapped in the worker's traceback."""

    def __init__(self, source: SampleSource, collate, layout: BatchLayout, items: list[tuple[int, int]]):
        self.source, self.collate, self.layout, self.items = source, collate, layout, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        step, chunk = self.items[i]
        try:
            samples = self.source.samples(step, chunk, self.layout)
            if not isinstance(self.collate, GraphCollator):
                return step, chunk, self.collate(samples)
            return step, chunk, self.collate.checked(samples, self._names(step, chunk, len(samples)))
        except DataError as err:
            return step, chunk, err

    def _names(self, step: int, chunk: int, count: int) -> list[str]:
        """What an error calls each sample: its dataset index where the source has one."""
        if hasattr(self.source, "indices"):
            return [f"dataset item {index}" for index in self.source.indices(step, chunk, self.layout)]
        return [f"sample {i} of chunk {chunk} in step {step}" for i in range(count)]


def _as_is(item):
    return item


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()
