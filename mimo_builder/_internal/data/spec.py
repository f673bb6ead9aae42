"""What ``run --data REF`` and ``--eval-data REF`` name: a function returning :class:`GraphData`.

    def train_data() -> GraphData:
        return GraphData(MyDataset("train"), ByteTokenizer(), num_workers=2)

``REF`` is ``module:function`` under an allowed module prefix (``--allow PREFIX``), or
``llava:PATH``, a LLaVA-format JSON file read by :func:`llava_data` (no ``--allow`` needed). Every
rank resolves it, then reads only its own shards of each batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from mimo_builder._internal.data.collate import GraphCollator
from mimo_builder._internal.data.graph_tokenizer import graph_tokenizer
from mimo_builder._internal.data.llava import LlavaDataset
from mimo_builder._internal.data.prompt import image_processing
from mimo_builder._internal.data.loader import IndexedSource, RankLoader
from mimo_builder._internal.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer  # noqa: F401 (public here too)
from mimo_builder._internal.errors import ConfigError, DependencyError, MimoError
from mimo_builder._internal.runtime.batch import check_batch
from mimo_builder._internal.validation import ValidGraph


@dataclass
class GraphData:
    """Samples for a graph and how to read them.

    ``dataset`` is a map-style dataset of sample dicts (see :mod:`mimo_builder._internal.data.collate`)
    or a ready :class:`~mimo_builder._internal.data.loader.SampleSource` (e.g. an Energon source).
    """

    dataset: Any
    tokenizer: Any = None
    """Encodes the text (None: the graph's own, ``tokenizer:`` in its document, else the byte
    tokenizer; :func:`load_data` resolves it)."""
    seq_length: int | None = None
    """Token rows per sample (None: the backbone's ``seq_length``)."""
    num_workers: int = 1
    """DataLoader workers per rank reading ahead (0: read in the rank's own process)."""

    def loader(self, valid: ValidGraph, rank: int, batch_size: int, *, num_microbatches: int = 1,
               first_step: int = 1, last_step: int, seed: int = 0, shuffle: bool = True,
               generation: bool = False) -> RankLoader:
        """``rank``'s batches for steps ``first_step..last_step`` (a map-style dataset is read in
        a fresh seeded order each epoch, or in order with ``shuffle=False``); ``generation``: the
        prompts to answer (:class:`GraphCollator`)."""
        source = self.dataset if hasattr(self.dataset, "samples") else IndexedSource(self.dataset, seed, shuffle)
        collate = GraphCollator(valid, self.words(valid), self.seq_length, generation=generation)
        return RankLoader(valid, source, collate, batch_size, rank, num_microbatches=num_microbatches,
                          first_step=first_step, last_step=last_step, num_workers=self.num_workers)

    def words(self, valid: ValidGraph):
        """The tokenizer: this data's own, else the graph's, else the byte tokenizer."""
        if self.tokenizer is not None:
            return self.tokenizer
        return graph_tokenizer(valid.graph) or ByteTokenizer()

    def check(self, valid: ValidGraph, where: str, generation: bool = False) -> None:
        """Collate the first sample of a map-style dataset for ``valid``, so that a sample the graph
        cannot take (a missing key, a prompt too long, a token count a node refuses) is an error
        naming ``where`` before any rank starts (as a prompt to answer with ``generation``). A
        streaming source is checked by its readers."""
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
            collate = GraphCollator(valid, self.words(valid), self.seq_length, generation=generation)
            check_batch(valid, collate([sample] * copies))
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


LLAVA = "llava:"
"""The prefix of a ``--data`` value that names a LLaVA-format JSON file."""


def load_data(ref: str, where: str, valid: ValidGraph | None = None, *, image_root: str | None = None,
              tokenizer: str | None = None) -> GraphData:
    """The GraphData ``ref`` names: ``llava:PATH`` through :func:`llava_data` for ``valid`` (images
    under ``image_root``, text through the Hugging Face tokenizer folder ``tokenizer``), else the
    result of the function ``module:function``, checked to be GraphData. Errors name ``where``."""
    if ref.startswith(LLAVA):
        if valid is None:
            raise ValueError("load_data: llava: data needs the validated graph (valid=...)")
        try:
            words = load_tokenizer(tokenizer) if tokenizer else graph_tokenizer(valid.graph)
            return llava_data(valid, ref, image_root, words)
        except DependencyError:
            raise
        except MimoError as err:
            raise ConfigError(f"{where}: {err}") from None
    extra = [flag for flag, value in (("--image-root", image_root), ("--tokenizer", tokenizer)) if value]
    if extra:
        raise ConfigError(f"{where} {ref}: {' and '.join(extra)} {'go' if len(extra) > 1 else 'goes'} with {where} llava:PATH; a module:function "
                          f"returns GraphData with its own tokenizer and files")
    data = _call_factory(ref, where)
    if data.tokenizer is None and valid is not None:
        data = dataclasses.replace(data, tokenizer=data.words(valid))
    return data


def llava_data(valid: ValidGraph, ref: str, image_root: str | None, tokenizer=None) -> GraphData:
    """GraphData over the LLaVA-format file ``ref`` (``llava:PATH`` or PATH, ``.json`` or ``.jsonl``)
    for ``valid``: images go to the batch key bound to a node's ``pixel_values`` port, sized for
    that node's ``patch_size``, ``num_channels`` and ``max_image_size`` (else ``image_size``);
    image paths are relative to ``image_root`` (None: the file's folder); ``tokenizer`` defaults
    to :class:`ByteTokenizer`."""
    path = ref.removeprefix(LLAVA)
    if not os.path.isfile(path):
        raise ConfigError(f"{LLAVA}{path}: no such file (a LLaVA-format .json or .jsonl)")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise ConfigError(f"image root {root!r} is not a folder")
    key, node = _image_input(valid)
    config = valid.configs[node]
    if not isinstance(getattr(config, "patch_size", None), int):
        raise ConfigError(f"{LLAVA}PATH data sizes images for node '{node}' (its {key!r} input), whose config "
                          f"has no patch_size")
    dataset = LlavaDataset(path, root, image_key=key, **image_processing(config))
    return GraphData(dataset, tokenizer or ByteTokenizer())


def _image_input(valid: ValidGraph) -> tuple[str, str]:
    """(batch key, node) of the graph's one input bound to a ``pixel_values`` port."""
    found = [(key, node) for key, (node, port) in valid.inputs.items() if port == "pixel_values"]
    if len(found) != 1:
        bound = ", ".join(f"{key} -> {node}.pixel_values" for key, node in found)
        raise ConfigError(f"{LLAVA}PATH data gives images to the graph input bound to a node's pixel_values port; "
                          + (f"this graph binds several ({bound})" if found else
                             "this graph binds none (inputs: " + ", ".join(valid.inputs) + ")"))
    return found[0]


def _call_factory(ref: str, where: str) -> GraphData:
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
