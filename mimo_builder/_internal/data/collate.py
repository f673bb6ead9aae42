"""Samples -> a graph batch: encoder inputs stacked (or ragged items), text tokenised around
modality placeholders.

A sample is a dict:

- per batch key the graph binds to an encoder input (e.g. ``pixel_values``): nothing (the key
  absent: a text-only sample), one item (``[C, H, W]`` for an image, ``[frames, mels]`` for a
  clip: the port's axes without the batch; tensors or numpy arrays), or a list of items, each
  of its own size within the encoder's limits (:mod:`~mimo_builder._internal.data.modalities`);
- the text, as ``prompt`` and ``answer`` or as ``messages``:

  - ``prompt``: text the model reads (no loss); ``answer``: text it learns to write after the
    prompt (loss on it and on the end of sequence that follows). A sample without an answer
    learns its whole prompt, one without a prompt its whole answer;
  - ``messages``: a conversation, ``[{"role": "system" | "user" | "assistant", "content": ...}]``
    over several turns; the loss learns the assistant's turns, each with its end of turn
    (:mod:`~mimo_builder._internal.data.conversation`: the tokenizer's chat template, or a plain one).

  In the text, ``<image>`` stands for the next item that reaches the backbone's ``image`` port
  (``<audio>`` for ``audio``, ...): each tag becomes as many placeholder tokens as that item
  brings (its encoder's ``item_tokens`` through the graph's edges). The tags of a port must
  number its items. Placeholders are never learned.

The backbone is the node whose ``input_ids`` port the batch feeds; its placeholder ids come
from its builder (``mimo_special_token_ids``). Sequences are right-padded to its
``seq_length`` with ``pad_id``, with no loss on padding.
"""

from __future__ import annotations

import re

import torch

from mimo_builder._internal.data.conversation import conversation_ids
from mimo_builder._internal.data.modalities import ModalityReader
from mimo_builder._internal.errors import ConfigError, DataError  # noqa: F401 (DataError: public here too)
from mimo_builder._internal.runtime.batch import tensor_problems
from mimo_builder._internal.runtime.packing import LENGTHS_PORT
from mimo_builder._internal.validation import ValidGraph

TEXT_PORTS = ("input_ids", "labels", "loss_mask", "position_ids", LENGTHS_PORT)


class GraphCollator:
    """Turns a list of samples into one batch (dict of tensors) for ``valid``'s bound inputs.

    Where the graph binds the backbone's ``seq_lengths`` (``Graph.packed()``, ``run --pack``), each
    sample's token count goes with it and the backbone packs the samples several to a row;
    ``pack=True`` asks for that and refuses a graph that does not bind it.

    ``generation=True`` collates prompts to answer (``generate``): a conversation without its final
    assistant turn, ended by the prompt that opens the assistant's turn; a ``prompt`` without its
    ``answer``. Nothing is learned; the loss mask marks one position, the one whose label is the
    first new token, which is where generation starts."""

    def __init__(self, valid: ValidGraph, tokenizer, seq_length: int | None = None, pack: bool = False,
                 generation: bool = False):
        self.valid, self.tokenizer, self.generation = valid, tokenizer, generation
        self.text_node = _text_node(valid)
        self.text_keys = {port: key for key, (node, port) in valid.inputs.items() if node == self.text_node}
        self.modalities = ModalityReader(valid, self.text_node)
        self.encoder_keys = self.modalities.keys
        builder = valid.builders[self.text_node]
        self.placeholders = dict(builder.mimo_special_token_ids())
        self.seq_length = seq_length or getattr(builder.config, "seq_length", None)
        if not self.seq_length:
            raise ConfigError(f"node '{self.text_node}' has no seq_length: give GraphCollator(seq_length=...)")
        self._tags = re.compile("<(" + "|".join(map(re.escape, self.placeholders)) + ")>") if self.placeholders else None
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
        rows = [self.tokenize(sample, name=name) for sample, name in zip(samples, names)]
        batch = {key: self.modalities.batch_value(key, samples, names) for key in self.encoder_keys}
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
        if not isinstance(sample, dict):
            raise DataError(f"{name} is a {type(sample).__name__}, not a dict of fields")
        tags = _TagFiller(self, self.modalities.placeholders(sample, name), name)
        if self.generation:
            return self._prompt_row(sample, tags, name)
        ids, learned, parts = self._text(sample, tags, name, False)
        tags.check_used()
        if len(ids) - 1 > self.seq_length or len(ids) < 2:
            raise DataError(f"{name}: {len(ids)} tokens{parts} do not fit node '{self.text_node}' "
                            f"seq_length {self.seq_length} (a sample needs 2 to {self.seq_length + 1})")
        placeholder_ids = set(self.placeholders.values())
        mask = [float(learn and token not in placeholder_ids) for token, learn in zip(ids[1:], learned[1:])]
        pad = self.seq_length - (len(ids) - 1)
        return {"input_ids": torch.tensor(ids[:-1] + [self.tokenizer.pad_id] * pad),
                "labels": torch.tensor(ids[1:] + [self.tokenizer.pad_id] * pad),
                "loss_mask": torch.tensor(mask + [0.0] * pad),
                "position_ids": torch.arange(self.seq_length),
                LENGTHS_PORT: torch.tensor(len(ids) - 1)}

    def _prompt_row(self, sample: dict, tags: "_TagFiller", name: str) -> dict[str, torch.Tensor]:
        """A generation row: the prompt, then padding; the mask marks where the answer starts."""
        if "messages" in sample:
            messages = sample["messages"]
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                    and messages[-1].get("role") == "assistant":
                messages = messages[:-1]  # the reference answer
            ids, _, parts = self._text({"messages": messages}, tags, name, True)
        else:
            if not isinstance(sample.get("prompt"), str) or not sample["prompt"]:
                raise DataError(f"{name} has no prompt to answer: give 'prompt' (text) or 'messages'")
            ids = tags.encode(sample["prompt"])
            parts = f" (prompt {len(ids)})"
        tags.check_used()
        if not 0 < len(ids) <= self.seq_length - 1:
            raise DataError(f"{name}: a prompt of {len(ids)} tokens{parts} leaves node '{self.text_node}' (seq_length "
                            f"{self.seq_length}) no room to answer; it may hold up to {self.seq_length - 1}")
        pad = self.seq_length - len(ids)
        return {"input_ids": torch.tensor(ids + [self.tokenizer.pad_id] * pad),
                "labels": torch.full((self.seq_length,), self.tokenizer.pad_id),
                "loss_mask": torch.nn.functional.one_hot(torch.tensor(len(ids) - 1), self.seq_length).float(),
                "position_ids": torch.arange(self.seq_length),
                LENGTHS_PORT: torch.tensor(len(ids))}

    def _text(self, sample: dict, tags: "_TagFiller", name: str, generation: bool):
        """The sample's ids, per id whether it is learned, and what its parts are (for errors)."""
        if "messages" in sample:
            extra = sorted(k for k in ("prompt", "answer") if sample.get(k) is not None)
            if extra:
                raise DataError(f"{name} has both 'messages' and {', '.join(map(repr, extra))}; give one form of text")
            ids, learned = conversation_ids(sample["messages"], self.tokenizer, tags.encode, name, generation=generation)
            return ids, learned, f" (a conversation of {len(sample['messages'])} turns)"
        for key in ("prompt", "answer"):
            if sample.get(key) is not None and not isinstance(sample[key], str):
                raise DataError(f"{name}[{key!r}] is of type {type(sample[key]).__name__}, not text (str)")
        if sample.get("prompt") is None and sample.get("answer") is None:
            raise DataError(f"{name} has no text: give 'prompt' and 'answer', or 'messages'")
        prompt = tags.encode(sample.get("prompt") or "")
        answer = self.tokenizer.encode(sample["answer"]) if sample.get("answer") is not None else []
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None and answer else []
        parts = f" (prompt {len(prompt)}, answer {len(answer)}{', end of sequence 1' if eos else ''})"
        if not answer:
            return prompt, [True] * len(prompt), parts
        return prompt + answer + eos, [False] * len(prompt) + [True] * (len(answer) + len(eos)), parts



def reference_answer(sample) -> str | None:
    """What a sample says its answer is: the final assistant turn's text, else ``answer``."""
    if not isinstance(sample, dict):
        return None
    messages = sample.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None
    answer = sample.get("answer")
    return answer if isinstance(answer, str) else None


class _TagFiller:
    """Encodes text with each modality tag replaced by the placeholders of the port's next item."""

    def __init__(self, collator: GraphCollator, counts: dict[str, list[int]], name: str):
        self.c, self.counts, self.name = collator, counts, name
        self.used = {port: 0 for port in counts}

    def encode(self, text: str) -> list[int]:
        """``text``'s ids, its tags expanded."""
        c, ids, at = self.c, [], 0
        for match in c._tags.finditer(text) if c._tags else ():
            ids += c.tokenizer.encode(text[at:match.start()])
            port = match.group(1)
            held = self.counts.get(port, [])
            if self.used.get(port, 0) >= len(held):
                raise DataError(f"{self.name}: the text names more <{port}> tags than the {len(held)} item(s) "
                                f"the sample brings to {c.text_node}.{port}{self._feeders(port)}")
            ids += [c.placeholders[port]] * held[self.used[port]]
            self.used[port] += 1
            at = match.end()
        return ids + c.tokenizer.encode(text[at:])

    def check_used(self) -> None:
        """A DataError when the text named fewer items of a port than the sample holds."""
        for port, held in sorted(self.counts.items()):
            if self.used[port] < len(held):
                raise DataError(f"{self.name}: the text names {self.used[port]} <{port}> tag(s) but the sample brings "
                                f"{len(held)} item(s) to {self.c.text_node}.{port}{self._feeders(port)}; each item "
                                f"is placed where its tag stands, in order")

    def _feeders(self, port: str) -> str:
        keys = [k for k in self.c.encoder_keys if port in self.c.modalities.reachable(k)]
        return f" (from {', '.join(map(repr, keys))})" if keys else " (no batch key feeds it)"


def _text_node(valid: ValidGraph) -> str:
    nodes = sorted({node for node, port in valid.inputs.values() if port == "input_ids"})
    if len(nodes) != 1:
        raise ConfigError(f"the collator needs exactly one node whose input_ids the batch feeds, found "
                          f"{nodes or 'none'}")
    return nodes[0]
