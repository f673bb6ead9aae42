"""What ``run --data REF`` and ``--eval-data REF`` name: a function returning :class:`GraphData`.

    def train_data() -> GraphData:
        return GraphData(MyDataset("train"), ByteTokenizer(), num_workers=2)

``REF`` is ``module:function`` under an allowed module prefix (``--allow PREFIX``); every rank
calls it, then reads only its own shards of each batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mimo_builder._internal.data.collate import GraphCollator
from mimo_builder._internal.data.loader import IndexedSource, RankLoader
from mimo_builder._internal.data.tokenizer import ByteTokenizer
from mimo_builder._internal.errors import ConfigError, MimoError
from mimo_builder._internal.runtime.batch import check_batch
from mimo_builder._internal.validation import ValidGraph


@dataclass
class GraphData:
    """Samples for a graph and how to read them.

    ``dataset`` is a map-style dataset of sample dicts (see :mod:`mimo_builder._internal.data.collate`)
    or a ready :class:`~mimo_builder._internal.data.loader.SampleSource` (e.g. an Energon source).
    """

    dataset: Any
    tokenizer: Any = field(default_factory=ByteTokenizer)
    seq_length: int | None = None
    """Token rows per sample (None: the backbone's ``seq_length``)."""
    num_workers: int = 1
    """DataLoader workers per rank reading ahead (0: read in the rank's own process)."""

    def loader(self, valid: ValidGraph, rank: int, batch_size: int, *, num_microbatches: int = 1,
               first_step: int = 1, last_step: int, seed: int = 0, shuffle: bool = True) -> RankLoader:
        """``rank``'s batches for steps ``first_step..last_step`` (a map-style dataset is read in
        a fresh seeded order each epoch, or in order with ``shuffle=False``)."""
        source = self.dataset if hasattr(self.dataset, "samples") else IndexedSource(self.dataset, seed, shuffle)
        collate = GraphCollator(valid, self.tokenizer, self.seq_length)
        return RankLoader(valid, source, collate, batch_size, rank, num_microbatches=num_microbatches,
                          first_step=first_step, last_step=last_step, num_workers=self.num_workers)

    def check(self, valid: ValidGraph, where: str) -> None:
        """Collate the first sample of a map-style dataset for ``valid``, so that a sample the graph
        cannot take (a missing key, a prompt too long, a token count a node refuses) is an error
        naming ``where`` before any rank starts. A streaming source is checked by its readers."""
        if hasattr(self.dataset, "samples"):
            return
        if len(self.dataset) == 0:
            raise ConfigError(f"{where}: the dataset is empty")
        try:
            sample = self.dataset[0]
        except Exception as err:  # the user's dataset: any failure is named, not a traceback
            raise ConfigError(f"{where}: reading sample 0 raised {type(err).__name__}: {err}") from None
        try:
            copies = math.lcm(*(layout.dp for layout in valid.layouts.values()))  # a batch every DP size divides
            check_batch(valid, GraphCollator(valid, self.tokenizer, self.seq_length)([sample] * copies))
        except MimoError as err:
            raise ConfigError(f"{where}: sample 0 does not fit the graph: {err}") from None

    def evaluation_steps(self, batch_size: int) -> int:
        """How many whole batches one pass over a map-style dataset makes."""
        if hasattr(self.dataset, "samples"):
            raise ConfigError("evaluation reads a map-style dataset (len and [i]) once, in order; "
                              "this GraphData holds a streaming source")
        steps = len(self.dataset) // batch_size
        if steps == 0:
            raise ConfigError(f"the evaluation set has {len(self.dataset)} samples, fewer than one batch "
                              f"of {batch_size}")
        return steps


def load_data(ref: str, where: str) -> GraphData:
    """Call the function ``ref`` names (``module:function``) and check it returned GraphData."""
    from mimo_builder._internal.kinds.registry import import_reference

    try:
        factory = import_reference(ref, where)
    except MimoError:
        raise
    except Exception as err:  # the module itself fails to import (a syntax error, a failing import)
        raise ConfigError(f"{where}: importing {ref.partition(':')[0]!r} raised {type(err).__name__}: {err}") from None
    if not callable(factory):
        raise ConfigError(f"{where}: {ref!r} is a {type(factory).__name__}, not a function returning GraphData")
    try:
        data = factory()
    except Exception as err:  # the user's factory: named, not a traceback
        raise ConfigError(f"{where}: {ref}() raised {type(err).__name__}: {err}") from None
    if not isinstance(data, GraphData):
        raise ConfigError(f"{where}: {ref}() returned {type(data).__name__}, not mimo_builder._internal.data.GraphData")
    return data
