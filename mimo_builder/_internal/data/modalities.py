"""A sample's modality items and the placeholder tokens each brings to the backbone.

A batch key bound to an encoder input may hold, per sample: nothing (the key absent or None:
no item), one array shaped as the port without its batch axis (one item), a list of such arrays
(0..N items, each of its own size), or an array with one more leading axis: a video's
``[frames, C, H, W]``, whose frames are items that one tag names together (a list may mix
images and videos; an encoder may group the frames, ``ModelBuilder.video_items``: RADIO's
tubelets). An audio item may also be the path of a ``.wav`` file (relative to the
working folder), which the encoder's builder turns into the features it takes
(:func:`~mimo_builder._internal.data.wav.wav_features`; the file is read each time the sample
is). Each item's size is checked by its encoder (``ModelBuilder.item_tokens``), which also says
how many tokens it becomes; the counts follow the edges (projectors' ``output_tokens``) to the
backbone's placeholder ports.
"""

from __future__ import annotations

import torch

from mimo_builder._internal.data.wav import is_wav, wav_features
from mimo_builder._internal.errors import ConfigError, DataError, MimoError
from mimo_builder._internal.kinds.contract import output_tokens_of
from mimo_builder._internal.runtime.items import Items
from mimo_builder._internal.validation import ValidGraph


class ModalityReader:
    """Reads the encoder inputs of samples for a graph whose backbone is ``text_node``."""

    def __init__(self, valid: ValidGraph, text_node: str):
        self.valid, self.text_node = valid, text_node
        self.keys = [key for key, (node, _) in valid.inputs.items() if node != text_node]
        self._tokens: dict[tuple, dict[str, int]] = {}

    def reachable(self, key: str) -> set[str]:
        """The backbone's ports that tokens of ``key``'s items reach along the edges."""
        nodes, ports = {self.valid.inputs[key][0]}, set()
        for name in self.valid.order:
            for edge in self.valid.edges:
                if edge.src in nodes and edge.dst == name:
                    nodes.add(name)
                    if name == self.text_node:
                        ports.add(edge.dst_port)
        return ports

    def items(self, sample: dict, key: str, name: str) -> list[torch.Tensor]:
        """The items ``sample`` holds under ``key`` (none when it lacks the key), a video's frames
        one by one."""
        return [item for unit in self.units(sample, key, name) for item in unit]

    def units(self, sample: dict, key: str, name: str) -> list[list[torch.Tensor]]:
        """What the text's tags name under ``key``, in order: an image or clip is one item, a video
        (an array with one more leading axis) its frames together (as its encoder groups them)."""
        value = sample.get(key)
        if value is None:
            return []
        node, port = self.valid.inputs[key]
        axes = len(self.valid.ports(node).inputs[port].dims) - 1
        values = value if isinstance(value, (list, tuple)) else [value]
        units = []
        for i, one in enumerate(values):
            where = f"{name}[{key!r}]" + (f"[{i}]" if values is value else "")
            whole = self._clip(one, node, where) if is_wav(one) else _tensor(one, where)
            if whole.dim() not in (axes, axes + 1):
                raise DataError(f"{where} must be an array without the batch axis: an item of {axes} axes or a "
                                f"video's frames ({axes + 1} axes){', or a list of them' if values is not value else ''}"
                                f", got shape {tuple(whole.shape)}")
            units.append([whole] if whole.dim() == axes else self.valid.builders[node].video_items(port, whole))
        return units

    def _clip(self, path, node: str, where: str) -> torch.Tensor:
        """The features ``node`` takes for the ``.wav`` file ``path`` (its builder's front end)."""
        try:
            return wav_features(path, self.valid.builders[node])
        except ValueError as err:  # a ConfigError too: a kind without an audio front end
            raise DataError(f"{where}: {path}: {err}") from None

    def item_tokens(self, key: str, item: torch.Tensor, where: str) -> dict[str, int]:
        """Placeholder tokens one item of ``key`` brings to each backbone port it reaches."""
        signature = (key, tuple(item.shape))
        if signature not in self._tokens:
            self._tokens[signature] = self._arrivals(key, signature[1], where)
        return self._tokens[signature]

    def placeholders(self, sample: dict, name: str) -> dict[str, list[int]]:
        """Per backbone port, the token count of each tagged unit (an item, a video's frames)
        arriving there, in order."""
        counts: dict[str, list[int]] = {}
        for key in self.keys:
            at = 0
            for unit in self.units(sample, key, name):
                total: dict[str, int] = {}
                for item in unit:
                    for port, n in self.item_tokens(key, item, f"{name}[{key!r}][{at}]").items():
                        total[port] = total.get(port, 0) + n
                    at += 1
                for port, n in total.items():
                    counts.setdefault(port, []).append(n)
        return counts

    def batch_value(self, key: str, samples: list[dict], names: list[str]) -> torch.Tensor | Items:
        """``key`` for a batch: a stacked tensor when every sample holds one item of the port's
        shape, else :class:`Items` (for an encoder that takes ragged items)."""
        items = [self.items(sample, key, name) for sample, name in zip(samples, names)]
        node, port_name = self.valid.inputs[key]
        port = self.valid.ports(node).inputs[port_name]
        if all(len(i) == 1 for i in items) and len({tuple(i[0].shape) for i in items}) == 1 \
                and _fits(port.shape, items[0][0].shape):
            return torch.stack([i[0] for i in items])
        if port_name in getattr(self.valid.builders[node], "ragged_inputs", frozenset()):
            return Items.of(items)
        for name, held in zip(names, items):
            if len(held) != 1:
                what = "has no" if not held else f"holds {len(held)} items of"
                raise DataError(f"{name} {what} {key!r}, which the graph binds to {node}.{port_name}; that node "
                                "takes exactly one item per sample")
        shapes = sorted({tuple(i[0].shape) for i in items})
        raise DataError(f"samples disagree on the shape of {key!r}: {shapes}; node '{node}' takes one shape: "
                        "resize or pad them to one shape before collating")

    def _arrivals(self, key: str, shape: tuple[int, ...], where: str) -> dict[str, int]:
        node, port = self.valid.inputs[key]
        try:
            known = {node: self.valid.builders[node].item_tokens(port, shape)}
        except (ValueError, MimoError) as err:
            raise DataError(f"{where}: {err}") from None
        arriving: dict[str, int] = {}
        for name in self.valid.order[self.valid.order.index(node) + 1:]:
            incoming = {e.dst_port: known[e.src][e.src_port] for e in self.valid.edges
                        if e.dst == name and e.src in known and e.src_port in known[e.src]}
            if not incoming:
                continue
            if name == self.text_node:
                arriving.update(incoming)
            else:
                try:
                    known[name] = output_tokens_of(name, self.valid.builders[name], incoming)
                except ConfigError as err:
                    raise DataError(f"{where}: {err}") from None
        return arriving


def _tensor(value, where: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{where} is of type {type(value).__name__}, not an array of numbers ({err})") from None


def _fits(declared: tuple | None, shape: torch.Size) -> bool:
    """Whether an item of ``shape`` fits a port declared ``declared`` (batch axis first)."""
    return declared is None or all(e is None or e == n for e, n in zip(declared[1:], shape))
