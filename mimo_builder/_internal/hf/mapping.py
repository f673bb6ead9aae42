"""How a node's parameters correspond to a Hugging Face model's tensors: rules, field checks, errors.

A builder that reads Hugging Face weights returns an :class:`HFMapping` from ``hf_mapping()``.
Each :class:`Rule` makes one node parameter (its full, TP=1 shape) from one or more HF tensors
and splits it back for export. The helpers here know Megatron-Core's layouts (fused QKV,
padded vocabularies), never a concrete model: those mappings live with the submodels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mimo_builder._internal.errors import MimoError, clip

MAX_LISTED = 12
"""An error lists at most this many tensor names."""


class HFWeightsError(MimoError, ValueError):
    """Hugging Face weights do not fit a node; the message names the node, folder and tensors."""


class UnknownHFTensorsError(HFWeightsError):
    """The folder holds tensors the node's mapping neither reads nor knows to skip."""


class MissingHFTensorsError(HFWeightsError):
    """The folder lacks tensors the node needs."""


class HFShapeError(HFWeightsError):
    """A tensor has another shape than the node's parameter needs."""


class HFConfigError(HFWeightsError):
    """config.json describes another model than the node's config."""


def listed(names, limit: int = MAX_LISTED) -> str:
    """Names sorted and clipped: ``'a', 'b', ... and 3 more``."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _take(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    return tensors[0]


def _give(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    """One node parameter made from HF tensors ``sources``; ``join(tensors, full_shape)`` builds
    it, ``split(param)`` gives the HF tensors back (export). Default: a rename."""

    param: str
    sources: tuple[str, ...]
    join: Callable[[list[torch.Tensor], torch.Size], torch.Tensor] = _take
    split: Callable[[torch.Tensor], list[torch.Tensor]] = _give


def rename(param: str, source: str) -> Rule:
    """The HF tensor ``source`` is the node parameter ``param`` as it is."""
    return Rule(param, (source,))


def reshaped(param: str, source: str, hf_shape: tuple[int, ...]) -> Rule:
    """The same values under another shape (e.g. a class token [H] vs [1, 1, H])."""
    return Rule(param, (source,), lambda ts, shape: ts[0].reshape(shape), lambda t: [t.reshape(hf_shape)])


def padded_rows(param: str, source: str, rows: int) -> Rule:
    """A vocabulary table of ``rows`` rows, padded with zero rows to the node's padded size."""
    def join(ts, shape):
        pad = shape[0] - ts[0].shape[0]
        return torch.cat([ts[0], ts[0].new_zeros((pad, *ts[0].shape[1:]))]) if pad > 0 else ts[0]
    return Rule(param, (source,), join, lambda t: [t[:rows]])


def fused_qkv(param: str, q: str, k: str | None, v: str, heads: int, groups: int) -> Rule:
    """Megatron-Core's ``linear_qkv`` (weight or bias) from separate q/k/v projections: per
    query group, that group's query heads, then its key head, then its value head. ``k=None``:
    the model has no key bias (zeros; export refuses a key bias that training made non-zero)."""
    per_group = heads // groups

    def join(ts, shape):
        qt, kt, vt = (ts[0], torch.zeros_like(ts[1]), ts[1]) if k is None else ts
        head = qt.shape[0] // heads
        parts = [qt.reshape(groups, per_group * head, *qt.shape[1:]),
                 kt.reshape(groups, head, *kt.shape[1:]), vt.reshape(groups, head, *vt.shape[1:])]
        return torch.cat(parts, dim=1).reshape(shape)

    def split(t):
        head = t.shape[0] // (groups * (per_group + 2))
        grouped = t.reshape(groups, (per_group + 2) * head, *t.shape[1:])
        qt, kt, vt = grouped.split([per_group * head, head, head], dim=1)
        out = [x.reshape(-1, *t.shape[1:]).contiguous() for x in (qt, kt, vt)]
        if k is None:
            if bool(out[1].ne(0).any()):
                raise HFWeightsError(f"{param}: the key bias is not zero, and the Hugging Face model has "
                                     "no key bias to hold it")
            del out[1]
        return out

    return Rule(param, (q, v) if k is None else (q, k, v), join, split)


@dataclass(frozen=True)
class Expect:
    """A config.json field the node's config fixes: its value, the node field it comes from, and
    the value transformers assumes when config.json omits the field."""

    value: Any
    node_field: str
    default: Any = None


@dataclass(frozen=True)
class Nesting:
    """Where a model's tensors sit inside a larger model's folder: a source name (as the model
    alone names it) starting with ``roots[i][0]`` is found there under ``roots[i][1]`` instead,
    e.g. ``(("backbone.", "model.language_model."), ("lm_head.", "lm_head."))`` for a language
    model inside a LLaVA folder. A plain prefix ``p`` is ``Nesting((("", p),))``."""

    roots: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, where: "str | Nesting") -> "Nesting":
        """``where`` as a Nesting (a plain prefix string becomes one root)."""
        return where if isinstance(where, Nesting) else cls((("", where),))

    def folder_name(self, source: str) -> str:
        """The folder's name of the tensor ``source``."""
        for mine, theirs in self.roots:
            if source.startswith(mine):
                return theirs + source[len(mine):]
        raise KeyError(f"{source!r} is under none of the roots {self.roots}")

    def source_name(self, name: str) -> str | None:
        """The source name of the folder's tensor ``name``, or None when it lies outside the roots
        (it belongs to the rest of a larger model)."""
        for mine, theirs in self.roots:
            if name.startswith(theirs):
                return mine + name[len(theirs):]
        return None


@dataclass(frozen=True)
class HFMapping:
    """Everything the generic loader needs to read (and write) one node's Hugging Face weights."""

    rules: tuple[Rule, ...]
    """One per node parameter."""

    expect: dict[str, Expect] = field(default_factory=dict)
    """config.json fields the node's config fixes; written on export."""

    export_config: dict[str, Any] = field(default_factory=dict)
    """Further config.json entries written on export (model_type, architectures, ...)."""

    skipped: tuple[str, ...] = ()
    """Prefixes (after the model prefix) of tensors known and deliberately not read."""

    prefixes: tuple["str | Nesting", ...] = ("",)
    """Where the node's tensors may sit in a larger model (e.g. 'vision_tower.' in a LLaVA
    folder, or a :class:`Nesting` of several roots); tensors outside the one found belong to the
    rest of that model."""

    config_section: str | None = None
    """Nested config.json entry that describes the node when present (e.g. 'vision_config')."""

    extra_checks: Callable[[dict], list[str]] | None = None
    """Further config.json problems (each naming the field), beyond ``expect``."""

    constants: Callable[[], dict[str, torch.Tensor]] | None = None
    """Tensors an export writes that the node computes instead of holding (e.g. a fixed
    position table); list them in ``skipped`` too."""

    def config_problems(self, hf_config: dict) -> list[str]:
        """What in ``hf_config`` (the node's section of config.json) disagrees with the node."""
        section = hf_config.get(self.config_section, hf_config) if self.config_section else hf_config
        problems = []
        for name, want in self.expect.items():
            have = section.get(name, want.default)
            if not _same(have, want.value):
                problems.append(f"config.json {name}={have!r} but the node has {want.node_field}={want.value!r}")
        if self.extra_checks is not None:
            problems += self.extra_checks(section)
        return problems

    def sources(self) -> set[str]:
        """Every HF tensor name the rules read (without prefix)."""
        return {s for rule in self.rules for s in rule.sources}

    def is_skipped(self, name: str) -> bool:
        """True when the HF tensor ``name`` (without model prefix) starts with one of the ``skipped`` prefixes."""
        return any(name.startswith(p) for p in self.skipped)

    def hf_config(self) -> dict[str, Any]:
        """The config.json an export writes."""
        return {**self.export_config, **{name: want.value for name, want in self.expect.items()}}


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return math.isclose(have, want, rel_tol=1e-9)
    return have == want


def problem_text(lines: list[str], limit: int = 400) -> str:
    """Problems as one message, each clipped."""
    return "\n".join(f"  - {clip(line, limit)}" for line in lines)
