"""The checks of a node's ``lora:`` settings at validation, before anything is built: the node
can take adapters, its targets are its linear layers (each once), and the rank fits them."""

from __future__ import annotations

from mimo_builder._internal.errors import excerpt
from mimo_builder._internal.kinds.builder import ModelBuilder
from mimo_builder._internal.kinds.config import ModelConfig


def lora_problems(name: str, node, builder: ModelBuilder, config: ModelConfig) -> list[str]:
    """What is wrong with node ``name``'s ``lora:`` for its builder and config, naming the field."""
    lora = node.lora
    if lora is None:
        return []
    where = f"node '{name}' lora"
    if node.frozen:
        return [f"{where}: a frozen node trains nothing; drop frozen: true (LoRA freezes the base weights itself)"]
    if getattr(config, "transformer", {}).get("sequence_parallel"):
        return [f"{where}: adapters with config.transformer.sequence_parallel are not supported; turn it off"]
    known = builder.linear_layers()
    if lora.targets is not None and not lora.targets:
        return [f"{where}.targets: empty; omit it to adapt every linear layer"]
    if known is not None and not known:
        return [f"{where}: builder '{node.builder}' declares no linear layers to adapt"]
    twice = sorted({t for t in lora.targets or () if lora.targets.count(t) > 1})
    if twice:
        return [f"{where}.targets: {', '.join(map(excerpt, twice))} listed more than once; list each layer once"]
    unknown = [t for t in lora.targets or () if known is not None and t not in known]
    if unknown:
        return [f"{where}.targets: {excerpt(t)} is not a linear layer of this node (it has: {', '.join(sorted(known))})"
                for t in unknown]
    return _lora_rank_problems(where, lora, builder.linear_sizes())


def _lora_rank_problems(where: str, lora, sizes: dict[str, tuple[int, int]] | None) -> list[str]:
    """An adapter's update ``B A`` has rank at most min(in, out) of its layer: a larger rank adds
    parameters and nothing else (likely a typo)."""
    targeted = {t: sizes[t] for t in (lora.targets or sizes or ()) if t in sizes} if sizes else {}
    small = {t: io for t, io in sorted(targeted.items()) if lora.rank > min(io)}
    if not small:
        return []
    layers = ", ".join(f"{t} ({i} in, {o} out)" for t, (i, o) in small.items())
    return [f"{where}.rank: {lora.rank} is larger than the smaller side of {layers}; an adapter's update has rank "
            f"at most min(in, out): lower rank to {min(min(io) for io in small.values())} or leave these layers "
            "out of lora.targets"]
