"""Samples -> a graph batch: encoder inputs stacked, text tokenised around modality placeholders.

A sample is a dict:

- one entry per batch key the graph binds to an encoder input (e.g. ``pixel_values`` as
  ``[channels, height, width]``, ``audio_features`` as ``[frames, mels]``: the port's axes
  without the batch axis; tensors or numpy arrays);
- ``prompt``: text the model reads (no loss), where ``<image>`` stands for the modality the
  backbone takes on its ``image`` port; each tag becomes as many placeholder tokens as that
  modality brings for this sample's input sizes (from each node's ``output_tokens``);
- ``answer``: text the model learns to write after the prompt (loss on it and on the end of
  sequence that follows). A sample without a prompt learns all of its text.

The backbone is the node whose ``input_ids`` port the batch feeds; its placeholder ids come
from its builder (``mimo_special_token_ids``). Sequences are right-padded to its
``seq_length`` with ``pad_id``, with no loss on padding.
"""

from __future__ import annotations

import re

import torch

from mimo_builder._internal.kinds.contract import output_tokens_of
from mimo_builder._internal.errors import ConfigError, DataError, MimoError  # noqa: F401 (DataError: public here too)
from mimo_builder._internal.runtime.batch import tensor_problems
from mimo_builder._internal.runtime.packing import LENGTHS_PORT
from mimo_builder._internal.validation import ValidGraph

TEXT_PORTS = ("input_ids", "labels", "loss_mask", "position_ids", LENGTHS_PORT)


class GraphCollator:
    """Turns a list of samples into one batch (dict of tensors) for ``valid``'s bound inputs.

    Where the graph binds the backbone's ``seq_lengths`` (``Graph.packed()``, ``run --pack``), each
    sample's token count goes with it and the backbone packs the samples several to a row;
    ``pack=True`` asks for that and refuses a graph that does not bind it."""

    def __init__(self, valid: ValidGraph, tokenizer, seq_length: int | None = None, pack: bool = False):
        self.valid, self.tokenizer = valid, tokenizer
        self.text_node = _text_node(valid)
        self.text_keys = {port: key for key, (node, port) in valid.inputs.items() if node == self.text_node}
        self.encoder_keys = [key for key, (node, _) in valid.inputs.items() if node != self.text_node]
        builder = valid.builders[self.text_node]
        self.placeholders = dict(builder.mimo_special_token_ids())
        self.seq_length = seq_length or getattr(builder.config, "seq_length", None)
        if not self.seq_length:
            raise ConfigError(f"node '{self.text_node}' has no seq_length: give GraphCollator(seq_length=...)")
        self._tags = re.compile("<(" + "|".join(map(re.escape, self.placeholders)) + ")>") if self.placeholders else None
        self._counts: dict[tuple, dict[str, int]] = {}
        if pack and LENGTHS_PORT not in self.text_keys:
            raise ConfigError(f"GraphCollator(pack=True): the graph binds no batch key to '{self.text_node}."
                              f"{LENGTHS_PORT}', which packing needs; bind one (Graph.packed() does, as run --pack; "
                              f"in a document: inputs: {{{LENGTHS_PORT}: {self.text_node}.{LENGTHS_PORT}}})")

    def __call__(self, samples: list[dict], names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The batch of ``samples``; a DataError names the sample at fault by ``names`` (default
        ``sample I``, its position in the list)."""
        if not samples:
            raise DataError("no samples to collate")
        names = names or [f"sample {i}" for i in range(len(samples))]
        batch = {key: self._stack(key, samples, names) for key in self.encoder_keys}
        rows = [self.tokenize(sample, name=name) for sample, name in zip(samples, names)]
        for port, key in self.text_keys.items():
            batch[key] = torch.stack([row[port] for row in rows])
        return batch

    def checked(self, samples: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
        """The batch of ``samples``, every bound tensor checked against its port (token ids within
        the vocabulary, finite values, dtypes, shapes) as a step checks it; a DataError names the
        first sample (by ``names``) that does not fit on its own."""
        batch = self(samples, names)
        if not tensor_problems(self.valid, batch):
            return batch
        for sample, name in zip(samples, names):
            problems = tensor_problems(self.valid, self([sample], [name]))
            if problems:
                raise DataError(f"{name}: {'; '.join(problems)}")
        raise DataError(f"{names[0]} to {names[-1]}: {'; '.join(tensor_problems(self.valid, batch))}")

    def tokenize(self, sample: dict, index: int = 0, name: str | None = None) -> dict[str, torch.Tensor]:
        """One sample's ``input_ids``, ``labels``, ``loss_mask`` and ``position_ids`` rows; errors
        call it ``name`` (default ``sample INDEX``)."""
        name = name or f"sample {index}"
        counts = self.modality_tokens(sample, name)
        prompt = self._prompt_ids(sample.get("prompt", ""), counts, name)
        for key in ("prompt", "answer"):
            if sample.get(key) is not None and not isinstance(sample[key], str):
                raise DataError(f"{name}[{key!r}] is of type {type(sample[key]).__name__}, not text (str)")
        answer = self.tokenizer.encode(sample["answer"]) if sample.get("answer") is not None else []
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None and answer else []
        ids = prompt + answer + eos
        if len(ids) - 1 > self.seq_length or len(ids) < 2:
            raise DataError(f"{name}: {len(ids)} tokens (prompt {len(prompt)}, answer {len(answer)}"
                            f"{', end of sequence 1' if eos else ''}) do not fit node '{self.text_node}' "
                            f"seq_length {self.seq_length} (a sample needs 2 to {self.seq_length + 1})")
        first_learned = max(len(prompt) - 1, 0) if answer else 0
        pad = self.seq_length - (len(ids) - 1)
        mask = [0.0] * first_learned + [1.0] * (len(ids) - 1 - first_learned) + [0.0] * pad
        return {"input_ids": torch.tensor(ids[:-1] + [self.tokenizer.pad_id] * pad),
                "labels": torch.tensor(ids[1:] + [self.tokenizer.pad_id] * pad),
                "loss_mask": torch.tensor(mask),
                "position_ids": torch.arange(self.seq_length),
                LENGTHS_PORT: torch.tensor(len(ids) - 1)}

    def modality_tokens(self, sample: dict, name: str = "the sample") -> dict[str, int]:
        """Placeholder tokens per backbone modality port, for this sample's input sizes."""
        lengths = {key: _length(sample, key, name) for key in self.encoder_keys}
        signature = tuple(sorted(lengths.items()))
        if signature not in self._counts:
            arriving = arriving_tokens(self.valid, lengths)
            self._counts[signature] = {port: n for (node, port), n in arriving.items() if node == self.text_node}
        return self._counts[signature]

    def _prompt_ids(self, prompt: str, counts: dict[str, int], name: str) -> list[int]:
        ids, seen, at = [], [], 0
        for match in self._tags.finditer(prompt) if self._tags else ():
            ids += self.tokenizer.encode(prompt[at:match.start()])
            port = match.group(1)
            if port not in counts:
                raise DataError(f"{name}: prompt tag <{port}> names a port of node '{self.text_node}' "
                                f"that no edge of the graph feeds")
            ids += [self.placeholders[port]] * counts[port]
            seen.append(port)
            at = match.end()
        ids += self.tokenizer.encode(prompt[at:])
        missing = sorted(set(counts) - set(seen))
        repeated = sorted({p for p in seen if seen.count(p) > 1})
        if missing or repeated:
            what = f"lacks {', '.join(f'<{p}>' for p in missing)}" if missing else \
                f"repeats {', '.join(f'<{p}>' for p in repeated)}"
            raise DataError(f"{name}: the prompt {what}; each modality that node '{self.text_node}' "
                            f"receives is placed once, where its tag stands")
        return ids

    def _stack(self, key: str, samples: list[dict], names: list[str]) -> torch.Tensor:
        values = []
        for name, sample in zip(names, samples):
            if key not in sample:
                node, port = self.valid.inputs[key]
                raise DataError(f"{name} has no {key!r}, which the graph binds to {node}.{port}")
            try:
                values.append(torch.as_tensor(sample[key]))
            except (TypeError, ValueError, RuntimeError) as err:
                raise DataError(f"{name}[{key!r}] is of type {type(sample[key]).__name__}, not an array of numbers "
                                f"({err})") from None
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise DataError(f"samples disagree on the shape of {key!r}: {sorted(shapes)}; resize or pad them "
                            "to one shape before collating")
        return torch.stack(values)


def arriving_tokens(valid: ValidGraph, lengths: dict[str, int]) -> dict[tuple[str, str], int]:
    """Token counts arriving on every port with a ``tokens`` axis, given the length of the first
    axis after the batch of each bound encoder input (``lengths``: batch key -> length)."""
    arriving: dict[tuple[str, str], int] = {}
    for name in valid.order:
        ports = {port: lengths[key] for key, (node, port) in valid.inputs.items() if node == name and key in lengths}
        ports.update({port: n for (node, port), n in arriving.items() if node == name})
        feeding = [e for e in valid.edges if e.src == name and "tokens" in valid.ports(e.dst).inputs[e.dst_port].dims]
        if not feeding:
            continue
        counts = output_tokens_of(name, valid.builders[name], ports)
        for edge in feeding:
            arriving[(edge.dst, edge.dst_port)] = counts[edge.src_port]
    return arriving


def _text_node(valid: ValidGraph) -> str:
    nodes = sorted({node for node, port in valid.inputs.values() if port == "input_ids"})
    if len(nodes) != 1:
        raise ConfigError(f"the collator needs exactly one node whose input_ids the batch feeds, found "
                          f"{nodes or 'none'}")
    return nodes[0]


def _length(sample: dict, key: str, name: str) -> int:
    value = sample.get(key)
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        raise DataError(f"{name}[{key!r}] must be an array without the batch axis, got {type(value).__name__}")
    return int(shape[0])
