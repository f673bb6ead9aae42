"""Evaluation metrics of a language model's last stage, on vocabulary-parallel logits."""

from __future__ import annotations

import torch
import torch.distributed as dist


def greedy_predictions(logits: torch.Tensor, tp_group, vocab_size: int | None = None) -> torch.Tensor:
    """The argmax token of ``logits`` ([batch, tokens, vocab / tp], this TP rank's vocabulary
    slice) over the whole vocabulary, its padding beyond ``vocab_size`` excluded: the same ids on
    every TP rank, ties to the lowest id."""
    tp = 1 if tp_group is None else tp_group.size()
    offset = dist.get_rank(tp_group) * logits.shape[-1] if tp > 1 else 0
    logits = logits.float()
    if vocab_size is not None and offset + logits.shape[-1] > vocab_size:
        padding = torch.arange(offset, offset + logits.shape[-1], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    best, index = logits.max(dim=-1)
    if tp <= 1:
        return index
    index = index + offset
    pairs = torch.stack([best, index.float()])
    gathered = [torch.empty_like(pairs) for _ in range(tp_group.size())]
    dist.all_gather(gathered, pairs, group=tp_group)
    bests = torch.stack([g[0] for g in gathered])  # [tp, batch, tokens]; slices in vocabulary order
    winner = bests.argmax(dim=0, keepdim=True)  # first (lowest-id) slice holding the maximum
    return torch.stack([g[1] for g in gathered]).gather(0, winner)[0].long()


def exact_match(predictions: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                cp_group=None) -> torch.Tensor:
    """Per sample: 1.0 when every token under the loss mask is predicted right, else 0.0 (a
    sample with no masked token counts as wrong). Under context parallelism each rank of
    ``cp_group`` holds its chunks of every sample; the verdict covers the whole sample, on each."""
    mask = torch.ones_like(labels, dtype=torch.bool) if loss_mask is None else loss_mask > 0
    wrong = ((predictions != labels) & mask).any(dim=1).float()
    learned = mask.any(dim=1).float()
    if cp_group is not None and cp_group.size() > 1:
        both = torch.stack([wrong, learned])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=cp_group)
        wrong, learned = both[0], both[1]
    return (1.0 - wrong) * learned
