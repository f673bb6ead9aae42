"""Sequence packing: the samples of a microbatch laid out several to a row.

A batch that binds ``seq_lengths`` (one count per sample: its tokens, the rest of its row is
padding) asks the node that reads it to pack: each sample's tokens go, whole and in order, into
rows of the node's ``seq_length`` (first fit, longest sample first), so that a row holds several
samples and little padding. :class:`Packing` is that layout for one microbatch. It gives the
packed tensors, each token's sequence number in its row (``seq_idx``: what MCore's Mamba training
path takes to restart its state), the per-sample causal attention mask and MCore's
``PackedSeqParams``. Everything per token (placeholders, labels, loss mask, positions) travels with
its token, so a packed step computes what the same samples one per row compute.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from mimo_builder._internal.errors import ConfigError

LENGTHS_PORT = "seq_lengths"


class PackingError(ConfigError):
    """Samples that do not fit the packed rows. A builder packs without knowing its node's name:
    the step running the node names it (:meth:`of_node`)."""

    def __init__(self, problem: str, node: str | None = None):
        self.problem, self.node = problem, node
        super().__init__(problem if node is None else f"node '{node}' {problem}")

    def of_node(self, node: str) -> "PackingError":
        """The same problem, naming ``node``."""
        return PackingError(self.problem, node)


@dataclass(frozen=True)
class Packing:
    """Where each sample's tokens sit in the packed rows of one microbatch."""

    rows: int
    row_length: int
    source: torch.Tensor
    """[rows * row_length] index into the flattened [samples * width] tokens, -1 for padding."""
    seq_idx: torch.Tensor
    """[rows, row_length] int32: each token's sequence number in its row; a row's padding is one
    more sequence after its samples."""
    samples: int
    """How many samples the rows hold."""

    @classmethod
    def plan(cls, lengths: torch.Tensor, width: int, row_length: int, node: str | None = None) -> "Packing":
        """Pack samples of ``lengths`` tokens (each the start of a row ``width`` wide) into rows of
        ``row_length``; a sample longer than a row is a PackingError (naming ``node`` where given;
        the step names the node it runs)."""
        counts = [int(n) for n in lengths.tolist()]
        for i, n in enumerate(counts):
            if not 1 <= n <= min(width, row_length):
                raise PackingError(f"{LENGTHS_PORT}[{i}] = {n}: a sample holds 1 to {min(width, row_length)} tokens "
                                   f"(its row is {width} wide, a packed row {row_length}, the node's seq_length)",
                                   node)
        source, seq_idx = [], []
        for row in _first_fit(counts, row_length):
            indices, ids = [], []
            for number, sample in enumerate(row):
                indices += range(sample * width, sample * width + counts[sample])
                ids += [number] * counts[sample]
            pad = row_length - len(indices)
            source += indices + [-1] * pad
            seq_idx.append(ids + [len(row)] * pad)
        return cls(len(seq_idx), row_length, torch.tensor(source, device=lengths.device),
                   torch.tensor(seq_idx, dtype=torch.int32, device=lengths.device), len(counts))

    def count(self) -> "PackedCount":
        """How many samples these rows hold, and how full they are."""
        return PackedCount(self.samples, self.rows, int((self.source >= 0).sum()), self.rows * self.row_length)

    def pack(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[samples, width, ...] -> [rows, row_length, ...], ``fill`` where a row is padding."""
        flat = values.flatten(0, 1)
        taken = flat[self.source.clamp(min=0)]
        pad = (self.source < 0).view(-1, *([1] * (flat.dim() - 1)))
        taken = torch.where(pad, torch.full_like(taken, fill), taken)
        return taken.view(self.rows, self.row_length, *values.shape[2:])

    def positions(self) -> torch.Tensor:
        """[rows, row_length]: each token's position in its own sample (0 at every sample's start)."""
        starts = torch.ones_like(self.seq_idx, dtype=torch.bool)
        starts[:, 1:] = self.seq_idx[:, 1:] != self.seq_idx[:, :-1]
        index = torch.arange(self.row_length, device=self.seq_idx.device).expand_as(self.seq_idx)
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        return index - first

    def attention_mask(self) -> torch.Tensor:
        """[rows, 1, row_length, row_length] bool, True where a query may not look (MCore's
        convention): a later token, or another sample's."""
        other = self.seq_idx[:, :, None] != self.seq_idx[:, None, :]
        future = torch.ones(self.row_length, self.row_length, dtype=torch.bool,
                            device=self.seq_idx.device).triu(diagonal=1)
        return (other | future)[:, None]

    def seq_params(self):
        """MCore's ``PackedSeqParams`` for these rows (``sbhd``: the rows stay a batch): ``seq_idx``
        for the Mamba mixer, ``cu_seqlens`` over the rows laid end to end."""
        from megatron.core.packed_seq_params import PackedSeqParams

        starts = torch.ones_like(self.seq_idx, dtype=torch.bool)
        starts[:, 1:] = self.seq_idx[:, 1:] != self.seq_idx[:, :-1]
        where = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([where, where.new_tensor([self.seq_idx.numel()])]).to(torch.int32)
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=self.row_length,
                               max_seqlen_kv=self.row_length, seq_idx=self.seq_idx)


@dataclass(frozen=True)
class PackedCount:
    """What packing made of some microbatches: their samples, the rows they went into, and how
    many of the rows' token slots hold a token (the rest is padding)."""

    samples: int = 0
    rows: int = 0
    tokens: int = 0
    slots: int = 0

    def __add__(self, other: "PackedCount") -> "PackedCount":
        return PackedCount(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def padding(self) -> float:
        """The share of the rows' slots that is padding."""
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    def line(self) -> str:
        """One line for the run's output, e.g. ``packed: 48 samples into 13 rows, padding 6.2%``."""
        return f"packed: {self.samples} samples into {self.rows} rows, padding {self.padding:.1%}"


def _first_fit(counts: list[int], row_length: int) -> list[list[int]]:
    """Sample indices per row: longest first into the first row with room (ties by index); each
    row lists its samples in index order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for sample in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        for r, left in enumerate(room):
            if counts[sample] <= left:
                rows[r].append(sample)
                room[r] -= counts[sample]
                break
        else:
            rows.append([sample])
            room.append(row_length - counts[sample])
    return [sorted(row) for row in rows]


def padding_share(lengths: torch.Tensor, row_length: int) -> float:
    """The share of a one-sample-per-row batch that is padding."""
    return 1.0 - float(lengths.sum()) / (len(lengths) * row_length)
