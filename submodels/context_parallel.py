"""Context parallelism for the local (non-Transformer-Engine) specs: the sequence split and an
exact attention over it.

MCore splits each sequence into ``2 * cp`` chunks and gives CP rank ``r`` chunks ``r`` and
``2*cp - 1 - r`` (``get_batch_on_this_cp_rank``: causal attention costs the same on every rank).
Mamba layers undo and redo that order inside MCore's own ``MambaContextParallel``; attention
needs a context-parallel core. MCore's local ``DotProductAttention`` refuses ``cp > 1``
(Transformer Engine's ring attention is GPU-only), so :class:`ContextParallelAttention` gathers
the keys and values of every CP rank and masks with global positions: each query attends to
exactly the keys it attends to at ``cp = 1`` (RoPE already rotates by global position: MCore's
rotary embedding takes the same chunks).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_batch_on_this_cp_rank


def cp_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in the CP ``group``; 1 when it is None."""
    return 1 if group is None else group.size()


def split_for_cp_rank(tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """This CP rank's part of batch-first tensors ``[batch, tokens, ...]`` (MCore's split)."""
    if cp_size(group) == 1:
        return tensors
    tokens = {v.shape[1] for v in tensors.values()}
    bad = [n for n in tokens if n % (2 * group.size())]
    if bad:
        raise ValueError(f"sequence length {bad[0]} is not divisible by 2 * cp = {2 * group.size()} "
                         "(context parallelism splits each sequence into 2 * cp equal chunks)")
    return get_batch_on_this_cp_rank({k: v.contiguous() for k, v in tensors.items()}, is_hybrid_cp=False,
                                     cp_group=group)


def cp_positions(tokens: int, size: int, device=None) -> torch.Tensor:
    """``[size, tokens / size]``: the global positions each CP rank holds, in its local order."""
    chunks = torch.arange(tokens, device=device).view(2 * size, tokens // (2 * size))
    return torch.stack([torch.cat([chunks[r], chunks[2 * size - 1 - r]]) for r in range(size)])


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 0); the backward sums every rank's gradient of the
    whole and keeps this rank's part (a reduce-scatter, from collectives gloo has)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(group.size())]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total.chunk(ctx.group.size())[ctx.group.rank()], None


def boundaries_in_mask(packed_seq_params):
    """None for packed rows in ``sbhd`` layout (:mod:`mimo_builder._internal.runtime.packing`): their sample
    boundaries are in the attention mask, and MCore's local attention takes no packed parameters."""
    if packed_seq_params is not None and packed_seq_params.qkv_format == "sbhd":
        return None
    return packed_seq_params


class ContextParallelAttention(DotProductAttention):
    """MCore's local ``DotProductAttention`` that also runs with ``cp > 1`` (load-balanced
    chunks): keys and values are gathered over the CP group, the causal mask uses global
    positions. With ``cp = 1`` it is ``DotProductAttention`` unchanged."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        single = copy.copy(config)
        single.context_parallel_size = 1  # the parent refuses cp > 1; the split is handled here
        super().__init__(single, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.config = config
        self.cp_group = getattr(pg_collection, "cp", None)
        if cp_size(self.cp_group) > 1:
            if attn_mask_type != AttnMaskType.causal or self.scale_mask_softmax.window_size is not None:
                raise ValueError("context-parallel local attention supports causal masks without a window only")
            # the mask is always given (global positions); the fused kernels must not build their own
            self.scale_mask_softmax.attn_mask_type = AttnMaskType.arbitrary

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """MCore's attention; with cp > 1, over keys and values of every CP rank, causal by global position."""
        packed_seq_params = boundaries_in_mask(packed_seq_params)
        size = cp_size(self.cp_group)
        if size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        key = _GatherSequence.apply(key, self.cp_group)
        value = _GatherSequence.apply(value, self.cp_group)
        positions = cp_positions(key.size(0), size, query.device)
        future = positions.flatten()[None, :] > positions[self.cp_group.rank()][:, None]  # [sq, sk]
        return super().forward(query, key, value, future[None, None], attn_mask_type, attention_bias,
                               packed_seq_params)
