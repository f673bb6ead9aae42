"""``GraphSchedule.generate``: new tokens after each sample's prompt, through the whole graph.

The encoders run once (one forward-only pass of the graph); the node that generates (the one
whose ports include a ``generated`` output, e.g. the hybrid backbone) decodes incrementally
inside that pass, with the :class:`GenerationOptions` the schedule hands it for the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo_builder._internal.errors import ConfigError

GENERATED = "generated"
SAMPLE_INDEX = "sample_index"
"""In a generation pass, the generating node's inputs also hold each row's index in the whole
batch under this name (its sampling stream's key)."""


@dataclass(frozen=True)
class GenerationOptions:
    """How a node picks each new token."""

    max_new_tokens: int
    temperature: float = 0.0
    """0: greedy (the most likely token); above 0: sampling from the softmax at this temperature."""
    top_k: int | None = None
    """With sampling: only the k most likely tokens (None: all)."""
    seed: int = 0
    """Seeds the sampling (the same draws on every rank of a node)."""
    eos_id: int | None = None
    """A row stops after generating this token (None: after ``max_new_tokens``)."""
    pad_id: int | None = None
    """Where no loss mask marks each prompt's end (a graph that binds none): the token that pads
    prompt rows, so a row's prompt ends at its last other token (None: every row is all prompt)."""

    def problems(self) -> list[str]:
        """What is wrong with these options, by field."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens: {self.max_new_tokens}; it must be at least 1")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            out.append(f"temperature: {self.temperature}; it must be finite and >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            out.append(f"top_k: {self.top_k}; it must be at least 1")
        return out


def generating_node(valid) -> str:
    """The one node with a ``generated`` output, on one pipeline stage without context
    parallelism (it decodes the whole model and sequence); ConfigError otherwise."""
    nodes = [n for n in valid.order if GENERATED in valid.ports(n).outputs]
    if len(nodes) != 1:
        raise ConfigError(f"generate: the graph needs exactly one node with a '{GENERATED}' output "
                          f"(a language model such as 'mamba'); it has {nodes or 'none'}")
    layout = valid.layouts[nodes[0]]
    for field, size in (("pp", layout.pp), ("cp", layout.cp)):
        if size > 1:
            raise ConfigError(f"generate: node '{nodes[0]}' placement.{field}: {size}; it decodes on one pipeline "
                              "stage with the whole sequence (pp=1, cp=1); export it or --colocate it smaller")
    return nodes[0]


def prompt_ends(ids: torch.Tensor, mask: torch.Tensor | None, pad_id: int | None) -> torch.Tensor:
    """Each row's prompt length: up to its first loss-masked label (the last prompt token predicts
    the first answer token), else up to its last token other than ``pad_id``, else the whole row."""
    if mask is not None:
        answer = mask > 0
        ends = answer.float().argmax(dim=1) + 1
        return torch.where(answer.any(dim=1), ends, torch.full_like(ends, ids.shape[1]))
    if pad_id is None:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    kept = (ids != pad_id).long()
    last = ids.shape[1] - kept.flip(dims=[1]).argmax(dim=1)  # one past the last kept token
    return torch.where(kept.any(dim=1), last, torch.ones_like(last))


def generate(schedule, batch, options: GenerationOptions, num_microbatches: int = 1) -> torch.Tensor | None:
    """Run one forward-only pass in which the generating node decodes with ``options``; the new
    tokens ``[batch, max_new_tokens]`` on global rank 0 (None on the other ranks)."""
    problems = options.problems()
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))
    node = generating_node(schedule.valid)
    builder = schedule.valid.builders[node]
    builder.generation = options
    try:
        result = schedule.evaluate(batch, num_microbatches, outputs=[f"{node}.{GENERATED}"])
    finally:
        builder.generation = None
    return result.get(f"{node}.{GENERATED}")
