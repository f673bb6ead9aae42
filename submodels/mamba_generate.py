"""Incremental generation with the hybrid backbone: the prompts are prefilled once, then each new
token costs one step through MCore's static inference context (each Mamba layer carries its
conv and SSM state, each attention layer its key/value cache; on CPU the decode step runs
through :mod:`submodels.mamba_decode`).

Prompts may differ in length: every prompt is embedded whole once (its modalities in place,
wherever its tags stand), the shortest common part is prefilled, and each later position takes
a row's own prompt embedding while it has one, else the embedding of the token generated for it.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode

from mimo_builder._internal.runtime.generation import GenerationOptions


def generate(model, core, vocab_size: int, embed, ids: torch.Tensor, prompt_lengths: torch.Tensor,
             options: GenerationOptions, banned: list[int] = (), rows: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens per row, ``[batch, max_new_tokens]`` (-1 after a row stopped).

    ``model`` is the node's chunk (``core`` its HybridModel); ``embed(ids, positions, place)``
    gives ``[tokens, batch, hidden]`` inputs, the modalities in place where ``place``; ``ids`` holds
    each row's prompt in its first ``prompt_lengths[i]`` positions; ``banned`` ids (the modality
    placeholders) are never picked. Sampling draws from one stream per row keyed by ``rows`` (each
    row's index in the whole batch; default its position), advanced only at the row's own new
    tokens, so a sample draws the same at any microbatch count, DP size or batch company."""
    batch, width = ids.shape
    shortest, longest = int(prompt_lengths.min()), int(prompt_lengths.max())
    total = longest + options.max_new_tokens
    positions = torch.arange(total, device=ids.device).expand(batch, total)
    context = StaticInferenceContext(batch, total)
    picker = _Picker(options, vocab_size, banned, rows if rows is not None else torch.arange(batch))
    out = torch.full((batch, options.max_new_tokens), -1, dtype=torch.long, device=ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    with torch.no_grad(), InferenceMode.active():
        prompts = embed(ids[:, :longest], positions[:, :longest], True)  # [longest, batch, hidden]
        logits = model(ids[:, :shortest], positions[:, :shortest], None, inference_context=context,
                       decoder_input=prompts[:shortest], runtime_gather_output=True)
        context.increment_sequence_len_offset(shortest)
        for t in range(shortest, total):
            index = t - prompt_lengths  # which new token position t's prediction is, per row
            active = (index >= 0) & (index < options.max_new_tokens) & ~done
            predicted = picker(logits[:, -1], active)
            out[active, index[active]] = predicted[active]
            if options.eos_id is not None:
                done |= active & (predicted == options.eos_id)
            if bool((done | (index >= options.max_new_tokens - 1)).all()):
                break
            in_prompt = t < prompt_lengths
            feed = torch.where(in_prompt, ids[:, min(t, width - 1)], predicted)[:, None]
            step = embed(feed, positions[:, t:t + 1], False)
            if t < longest:
                step = torch.where(in_prompt[None, :, None], prompts[t:t + 1], step)
            logits = model(feed, positions[:, t:t + 1], None, inference_context=context, decoder_input=step,
                           runtime_gather_output=True)
            context.increment_sequence_len_offset(1)
    return out


class _Picker:
    """Greedy or seeded sampling over the first ``vocab_size`` logits (the rest is TP padding),
    never a ``banned`` id; each of the ``rows`` samples from its own stream."""

    def __init__(self, options: GenerationOptions, vocab_size: int, banned=(), rows: torch.Tensor | None = None):
        self.options, self.vocab_size = options, vocab_size
        self.banned = [i for i in banned if 0 <= i < vocab_size]
        rows = torch.arange(1) if rows is None else rows
        self.streams = [torch.Generator().manual_seed(_stream_seed(options.seed, int(r))) for r in rows]

    def __call__(self, logits: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row; only ``active`` rows draw from their streams (the rest take
        the argmax, which is not used)."""
        logits = logits[..., :self.vocab_size].float()
        if self.banned:
            logits[..., self.banned] = float("-inf")
        picked = logits.argmax(dim=-1)
        if self.options.temperature <= 0:
            return picked
        device, logits = logits.device, (logits / self.options.temperature).cpu()
        if self.options.top_k is not None:
            kth = logits.topk(min(self.options.top_k, self.vocab_size), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probabilities = logits.softmax(dim=-1)
        drawing = range(len(picked)) if active is None else active.nonzero().flatten().tolist()
        for row in drawing:
            picked[row] = torch.multinomial(probabilities[row], 1, generator=self.streams[row])[0].to(device)
        return picked


def _stream_seed(seed: int, row: int) -> int:
    """A 63-bit seed for row ``row`` of a call seeded ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + row + 1) & (2 ** 64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (z ^ (z >> 31)) >> 1
