"""A ragged workload for ``plan`` and ``place``: how many items (images, clips) a sample holds per
batch key, and what that does to the nodes those items flow through.

``--items-per-sample KEY=SPEC`` (repeatable) names a batch key bound to an encoder input and
either a mean (``pixel_values=3.5``: samples hold 3 or 4 items, the mean 3.5, so at most 4) or a
distribution ``COUNT:SHARE,...`` (``pixel_values=0:0.2,1:0.5,4:0.3``, shares summing to 1).
:func:`from_samples` counts them in a dataset's first samples. A key not named holds one item
per sample (what the plan assumed before).

What the items cost, per microbatch of ``B`` samples on one rank (the runtime's
:func:`~mimo_builder._internal.runtime.items.run_items`):

- **the encoder** the key feeds runs the flat list of the microbatch's items, ``B x mean`` of
  them on average: its FLOPs scale by the mean. Its activations are the worst microbatch's, ``B
  x max`` items (every sample holding the most), so that a plan that fits, fits every step;
- **nodes downstream of it** (projectors; not the backbone, whose placeholders live inside its
  ``seq_length``) take the encoder's tokens padded to the microbatch's longest sample, ``B x
  longest`` items' tokens: FLOPs are the expectation over the longest of ``B`` samples drawn
  from the distribution, activations those of ``B x max`` again.

Each item is taken at the size the plan already assumed for one (the encoder's configured
image or clip size).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.costs import StageCost

FLAG = "--items-per-sample"
EXAMPLE = "e.g. pixel_values=3.5 or pixel_values=0:0.2,1:0.5,4:0.3"
TOLERANCE = 1e-6  # shares may sum to 1 within this


@dataclass(frozen=True)
class ItemCounts:
    """How many items a sample holds under one batch key: a distribution over counts."""

    shares: tuple[tuple[int, float], ...]
    """(count, share of the samples holding that many), counts ascending, shares summing to 1."""

    mean: float
    """Items per sample on average."""

    @classmethod
    def parse(cls, key: str, text: str) -> ItemCounts:
        """``3.5`` (a mean) or ``0:0.2,1:0.5,4:0.3`` (a distribution); a ConfigError naming the key."""
        if ":" in text:
            return cls.of_shares(key, [_pair(key, part) for part in text.split(",")])
        return cls.of_mean(key, _number(key, text, "the mean"))

    @classmethod
    def of_mean(cls, key: str, mean: float) -> ItemCounts:
        """Samples holding ``floor(mean)`` or ``ceil(mean)`` items, in the shares that make ``mean``
        (a mean alone says nothing of a tail: give a distribution for one)."""
        if mean < 0:
            raise ConfigError(f"{FLAG} {key}: a sample holds 0 or more items, got a mean of {mean:g}")
        low = math.floor(mean)
        shares = ((low, 1.0),) if mean == low else ((low, low + 1 - mean), (low + 1, mean - low))
        return cls(shares, mean)

    @classmethod
    def of_shares(cls, key: str, pairs: list[tuple[int, float]]) -> ItemCounts:
        """The distribution of ``(count, share)`` pairs, each count once, shares summing to 1."""
        counts = [count for count, _ in pairs]
        twice = sorted({c for c in counts if counts.count(c) > 1})
        if twice:
            raise ConfigError(f"{FLAG} {key}: count {twice[0]} is given twice; give each count once")
        total = sum(share for _, share in pairs)
        if abs(total - 1) > TOLERANCE:
            raise ConfigError(f"{FLAG} {key}: the shares sum to {total:g}, not 1 ({EXAMPLE})")
        shares = tuple(sorted((c, s) for c, s in pairs if s > 0))
        return cls(shares, sum(c * s for c, s in shares))

    @classmethod
    def of_counts(cls, counts: list[int]) -> ItemCounts:
        """The distribution of measured counts (one per sample)."""
        if not counts:
            raise ValueError("ItemCounts.of_counts: no samples counted")
        tally = Counter(counts)
        return cls(tuple((c, n / len(counts)) for c, n in sorted(tally.items())), sum(counts) / len(counts))

    @property
    def largest(self) -> int:
        """The most items a sample holds."""
        return self.shares[-1][0]

    def longest(self, samples: int) -> list[tuple[int, float]]:
        """The distribution of the largest count among ``samples`` samples drawn independently."""
        out, below, seen = [], 0.0, 0.0
        for count, share in self.shares:
            seen += share
            at_most = min(seen, 1.0) ** samples
            out.append((count, at_most - below))
            below = at_most
        return out

    def expected_longest(self, samples: int) -> float:
        """The expected largest count among ``samples`` samples (what padding makes every sample hold)."""
        return sum(count * p for count, p in self.longest(samples))

    def describe(self) -> str:
        """'3.5 items per sample (max 4)'."""
        return f"{self.mean:.3g} items per sample (max {self.largest})"

    def as_dict(self) -> dict:
        """JSON-ready: the mean, the largest count and the shares by count."""
        return {"mean": self.mean, "max": self.largest, "shares": {str(c): s for c, s in self.shares}}


@dataclass(frozen=True)
class NodeItems:
    """How one node's work scales with the items of the key it takes them from."""

    key: str
    counts: ItemCounts
    encoder: bool
    """True: the node the key feeds (it runs the items flat); False: downstream of it (padded)."""
    ports: frozenset[str] = frozenset()
    """Downstream: the edge-fed ports whose tokens come from the items."""

    def row_factor(self, samples: float) -> float:
        """One-item samples' worth of work per sample in a call over ``samples`` samples."""
        if self.encoder:
            return self.counts.mean
        return self.counts.expected_longest(max(1, round(samples)))

    def stage_costs(self, builder, config, micro_batch: int, tokens: dict[str, int]) -> list[StageCost]:
        """The builder's costs of one microbatch under these items: FLOPs expected, activations of
        the worst microbatch (``micro_batch x max`` items)."""
        if self.encoder:  # items are rows of its call: linear in them
            return [_scaled(s, self.counts.largest, self.counts.mean) for s in
                    builder.stage_costs(config, micro_batch, tokens)]
        worst = self._costs(builder, config, micro_batch, tokens, self.counts.largest)
        flops = [0.0] * len(worst)
        recompute = [0.0] * len(worst)
        for count, p in self.counts.longest(micro_batch):
            for k, s in enumerate(self._costs(builder, config, micro_batch, tokens, count)):
                flops[k] += p * s.forward_flops
                recompute[k] += p * s.recompute_flops
        return [StageCost(w.activation_bytes, round(f), round(r)) for w, f, r in zip(worst, flops, recompute)]

    def _costs(self, builder, config, micro_batch, tokens, count) -> list[StageCost]:
        if count == 0:  # no item in the microbatch: the node runs on no token
            return [StageCost(0, 0) for _ in builder.stage_costs(config, micro_batch, tokens)]
        padded = {port: n * count if port in self.ports else n for port, n in tokens.items()}
        return builder.stage_costs(config, micro_batch, padded)

    def describe(self, node: str, micro_batch: int) -> str:
        """What the items do to the node's FLOPs and activations, for the plan's notes."""
        most = self.counts.largest
        if self.encoder:
            return (f"{node} ({self.key}): {self.counts.describe()}: FLOPs x {self.counts.mean:.3g}, "
                    f"activations x {most} (a microbatch of samples holding {most} each)")
        return (f"{node}: padded to a microbatch's longest sample: FLOPs x "
                f"{self.counts.expected_longest(micro_batch):.3g} (the expected longest of {micro_batch}), "
                f"activations x {most}")


@dataclass(frozen=True)
class Workload:
    """Items per sample by batch key (a key not named: one item per sample)."""

    counts: dict[str, ItemCounts] = field(default_factory=dict)
    source: str = FLAG
    """Where the counts come from (for the plan's notes)."""

    @classmethod
    def parse(cls, specs: list[str]) -> Workload:
        """``KEY=SPEC`` strings as given to ``--items-per-sample`` (syntax only: :meth:`check`
        compares the keys with a graph)."""
        counts: dict[str, ItemCounts] = {}
        for spec in specs:
            key, sep, text = spec.partition("=")
            key, text = key.strip(), text.strip()
            if not sep or not key or not text:
                raise ConfigError(f"{FLAG} {spec!r}: expected KEY=SPEC ({EXAMPLE})")
            if key in counts:
                raise ConfigError(f"{FLAG} {key}: given twice; give each key once")
            counts[key] = ItemCounts.parse(key, text)
        return cls(counts)

    def merged(self, other: Workload) -> Workload:
        """These counts with ``other``'s for the keys it names (a flag over what data measured)."""
        if not other.counts:
            return self
        if not self.counts:
            return other
        return Workload({**self.counts, **other.counts}, f"{self.source}, {other.source}")

    def check(self, valid) -> None:
        """A ConfigError naming the flag and key for a key the graph does not bind to an encoder
        input, or a count other than one for an encoder that takes one item per sample."""
        text, modality = text_nodes(valid), modality_keys(valid)
        for key, counts in self.counts.items():
            if key not in valid.inputs:
                raise ConfigError(f"{FLAG} {key}: the graph binds no batch key {key!r}; keys bound to encoder "
                                  f"inputs: {', '.join(modality) or 'none'}")
            node, port = valid.inputs[key]
            if node in text:
                raise ConfigError(f"{FLAG} {key}: {key!r} feeds the backbone's {node}.{port}, not an encoder; "
                                  f"give the keys bound to encoder inputs ({', '.join(modality) or 'none'})")
            ragged = port in getattr(valid.builders[node], "ragged_inputs", frozenset())
            if not ragged and counts.shares != ((1, 1.0),):
                raise ConfigError(f"{FLAG} {key}: node '{node}' takes exactly one item per sample on {port} "
                                  "(its builder lists no ragged input there); only 1 describes it")

    def node_items(self, valid) -> dict[str, NodeItems]:
        """Per node the items fed to it or upstream of it: the encoder each key feeds and the nodes
        below it up to the backbone (a ConfigError where two keys reach one node)."""
        text, out = text_nodes(valid), {}
        for key, counts in self.counts.items():
            encoder = valid.inputs[key][0]
            chain = {encoder: NodeItems(key, counts, True)}
            for name in valid.order:
                ports = frozenset(e.dst_port for e in valid.edges if e.dst == name and e.src in chain)
                if ports and name not in text and name not in chain:
                    chain[name] = NodeItems(key, counts, False, ports)
            for name, items in chain.items():
                if name in out:
                    raise ConfigError(f"{FLAG}: node '{name}' takes items of both {out[name].key!r} and {key!r}; "
                                      "describe one of them (a node fed by two ragged keys is not planned yet)")
                out[name] = items
        return out

    def as_dict(self) -> dict:
        """JSON-ready: the source and each key's counts."""
        return {"source": self.source, "keys": {k: c.as_dict() for k, c in self.counts.items()}}


def text_nodes(valid) -> set[str]:
    """The backbones: nodes whose ``input_ids`` port the batch feeds."""
    return {node for node, port in valid.inputs.values() if port == "input_ids"}


def modality_keys(valid) -> list[str]:
    """Batch keys bound to an input of a node other than a backbone."""
    text = text_nodes(valid)
    return [key for key, (node, _) in valid.inputs.items() if node not in text]


def from_samples(valid, samples: list[dict], source: str = "samples") -> Workload:
    """The items per sample each modality key of ``valid`` holds in ``samples`` (a DataError
    naming a sample whose value is not an item, a list of items or a stack of them)."""
    from mimo_builder._internal.data.modalities import ModalityReader

    if not samples:
        raise ConfigError(f"{source}: no samples to count items in")
    reader = ModalityReader(valid, next(iter(text_nodes(valid)), None))
    keys = modality_keys(valid)
    counts = {key: ItemCounts.of_counts([len(reader.items(_sample(s, i), key, f"sample {i}"))
                                         for i, s in enumerate(samples)]) for key in keys}
    return Workload(counts, source)


def from_data(valid, ref: str, count: int, image_root: str | None = None) -> Workload:
    """The items per sample of the first ``count`` samples of the map-style dataset ``--data
    REF`` names (:func:`~mimo_builder._internal.data.spec.load_data`)."""
    from mimo_builder._internal.data.spec import load_data

    dataset = load_data(ref, "--data", valid, image_root=image_root).dataset
    if hasattr(dataset, "samples") or not hasattr(dataset, "__len__"):
        raise ConfigError(f"--data {ref}: a streaming source has no first samples to count items in; "
                          f"give the counts with {FLAG} KEY=SPEC")
    samples = []
    for i in range(min(count, len(dataset))):
        try:
            samples.append(dataset[i])
        except Exception as err:  # the user's dataset: any failure is named, not a traceback
            raise ConfigError(f"--data {ref}: reading sample {i} raised {type(err).__name__}: {err}") from None
    return from_samples(valid, samples, f"--data: first {len(samples)} samples")


def _sample(sample, index: int) -> dict:
    if not isinstance(sample, dict):
        raise ConfigError(f"sample {index} is a {type(sample).__name__}, not a dict of fields")
    return sample


def _scaled(cost: StageCost, memory: float, flops: float) -> StageCost:
    return StageCost(round(cost.activation_bytes * memory), round(cost.forward_flops * flops),
                     round(cost.recompute_flops * flops))


def _number(key: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise ConfigError(f"{FLAG} {key}: {what} must be a number, got {text!r} ({EXAMPLE})")
    return value


def _pair(key: str, part: str) -> tuple[int, float]:
    count, sep, share = part.strip().partition(":")
    if not sep:
        raise ConfigError(f"{FLAG} {key}: {part.strip()!r} is not COUNT:SHARE ({EXAMPLE})")
    number = _number(key, count, "a count")
    if number < 0 or number != int(number):
        raise ConfigError(f"{FLAG} {key}: a count is a whole number of items, 0 or more, got {count.strip()!r}")
    value = _number(key, share, f"the share of count {int(number)}")
    if value < 0:
        raise ConfigError(f"{FLAG} {key}: the share of count {int(number)} is negative ({share.strip()})")
    return int(number), value
