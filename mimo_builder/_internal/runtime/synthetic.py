"""Synthetic batches for any graph: each node makes random inputs for its batch-bound ports,
with token counts propagated along the edges (placeholders in the backbone match the encoders)."""

from __future__ import annotations

import torch

from mimo_builder._internal.kinds.contract import class_name, output_tokens_of, synthetic_problems
from mimo_builder._internal.errors import ConfigError, GraphError
from mimo_builder._internal.validation import ValidGraph


def check_synthetic(valid: ValidGraph) -> None:
    """Every node the batch feeds can make synthetic inputs (what ``mimo-builder run`` needs), and
    a one-sample batch passes every node's token counts (a count a node refuses names the node)."""
    problems = []
    for name in valid.order:
        bound = [port for node, port in valid.inputs.values() if node == name]
        problems += synthetic_problems(name, valid.builders[name], bound)
    if problems:
        raise GraphError(problems)
    synthetic_batch(valid, 1)


def synthetic_batch(valid: ValidGraph, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same batch on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    batch, produced = {}, {}
    for name in valid.order:
        builder = valid.builders[name]
        arriving = {e.dst_port: produced[(e.src, e.src_port)] for e in valid.edges
                    if e.dst == name and (e.src, e.src_port) in produced}
        bound = {port: key for key, (node, port) in valid.inputs.items() if node == name}
        made = _made(name, builder, batch_size, generator, arriving) if bound else {}
        for port, key in bound.items():
            if port in made:
                batch[key] = made[port]
        lengths = {**arriving, **{p: t.shape[1] for p, t in made.items() if t.dim() > 1}}
        produced.update(_counted_outputs(valid, name, lengths))
    return batch


def check_token_budget(valid: ValidGraph) -> None:
    """Every node the batch feeds can take the tokens arriving on its ports (a backbone's
    ``seq_length`` must hold every modality's tokens and some text): a one-sample synthetic batch,
    where every such node can make one (what ``validate`` checks; ``run`` checks more)."""
    for name in valid.order:
        bound = [port for node, port in valid.inputs.values() if node == name]
        if synthetic_problems(name, valid.builders[name], bound):
            return  # a kind that cannot make samples: its real data decides (checked by run --data)
    synthetic_batch(valid, 1)


def _made(name: str, builder, batch_size: int, generator, arriving: dict[str, int]) -> dict[str, torch.Tensor]:
    """``builder.synthetic_inputs``; a count it refuses is an error naming ``name``."""
    try:
        return builder.synthetic_inputs(batch_size, generator, arriving)
    except ConfigError as err:
        raise ConfigError(f"node '{name}' {err}") from None


def _counted_outputs(valid: ValidGraph, name: str, lengths: dict[str, int]) -> dict[tuple[str, str], int]:
    """Token counts of ``name``'s outputs that feed a port with a 'tokens' axis."""
    needed = {e.src_port for e in valid.edges
              if e.src == name and "tokens" in valid.ports(e.dst).inputs[e.dst_port].dims}
    if not needed:
        return {}
    builder = valid.builders[name]
    counts = output_tokens_of(name, builder, lengths)
    missing = sorted(needed - set(counts))
    if missing:
        raise ConfigError(f"node '{name}': {class_name(type(builder))}.output_tokens() gave no token count for "
                          f"{missing} (it returned {sorted(counts)}); return one for every output that feeds tokens")
    return {(name, port): counts[port] for port in needed}
