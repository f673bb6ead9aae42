"""Core attention through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient
kernels on CUDA) for nodes built without Transformer Engine.

:class:`SDPAttention` is MCore's local core attention (:class:`ContextParallelAttention`, itself
``DotProductAttention``) whose plain cases go to SDPA: causal or no mask, or a boolean mask; a
plain softmax without window. Anything else (context parallelism, a sliding window, an attention
bias, THD packed sequences, a softmax offset) runs MCore's own path unchanged. It has no parameters,
so checkpoints do not depend on it. A node picks it with ``impl: sdpa``; ``impl: auto`` picks it on
CUDA when Transformer Engine is absent (see :func:`core_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from mimo_builder._internal.kinds import costs

from submodels.context_parallel import ContextParallelAttention, boundaries_in_mask, cp_size


class SDPAttention(ContextParallelAttention):
    """MCore's core attention computed by ``torch.nn.functional.scaled_dot_product_attention``."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """Context [sq, b, heads x head size] of query [sq, b, np, hn] and key/value [sk, b, ng, hn]."""
        packed_seq_params = boundaries_in_mask(packed_seq_params)
        if not self._plain(attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        causal = self.attn_mask_type == AttnMaskType.causal and attention_mask is None and q.shape[2] > 1
        keep = None if attention_mask is None else ~attention_mask  # MCore masks where True
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale)
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], self.hidden_size_per_partition)

    def _plain(self, attention_mask, attention_bias, packed_seq_params) -> bool:
        """Whether SDPA computes exactly what MCore's local path would."""
        return (cp_size(self.cp_group) == 1 and attention_bias is None and packed_seq_params is None
                and not self.config.apply_query_key_layer_scaling
                and self.softmax_offset is None and self.scale_mask_softmax.window_size is None
                and (attention_mask is None or attention_mask.dtype == torch.bool))


def core_attention(impl: str) -> type:
    """The local core attention for a node's ``impl``: SDPA for ``sdpa``, and for ``auto`` on CUDA
    (where ``auto`` means no Transformer Engine here); MCore's local one otherwise."""
    if costs.local_sdpa(impl):
        return SDPAttention
    return ContextParallelAttention


def with_core_attention(layer_spec, impl: str):
    """A local transformer layer spec with :func:`core_attention`'s class as its core attention
    (the spec itself, changed in place: MCore's spec functions return a fresh one per call)."""
    if core_attention(impl) is SDPAttention:
        layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return layer_spec
