"""Synthetic batches for any graph: each node makes random inputs for its batch-bound ports,
with token counts propagated along the edges (placeholders in the backbone match the encoders)."""

from __future__ import annotations

import torch

from mimo_builder.validation import ValidGraph


def synthetic_batch(valid: ValidGraph, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same batch on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    batch, produced = {}, {}
    for name in valid.order:
        builder = valid.builders[name]
        arriving = {e.dst_port: produced[(e.src, e.src_port)] for e in valid.edges if e.dst == name}
        bound = {port: key for key, (node, port) in valid.inputs.items() if node == name}
        made = builder.synthetic_inputs(batch_size, generator, arriving) if bound else {}
        for port, key in bound.items():
            if port in made:
                batch[key] = made[port]
        lengths = {**arriving, **{p: t.shape[1] for p, t in made.items() if t.dim() > 1}}
        for port, count in builder.output_tokens(lengths).items():
            produced[(name, port)] = count
    return batch
