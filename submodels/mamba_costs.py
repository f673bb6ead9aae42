"""Activation memory and FLOPs of the Mamba/hybrid backbone, for the plan's estimates.

A Mamba-2 layer is counted as the tensors MCore's ``MambaMixer`` and mamba-ssm's kernels keep for
backward, per token on one rank (``d`` = d_inner, ``g*n`` = B/C groups times state size, ``nh`` =
heads, all split over TP), besides the layer norm with its output and the ``in_proj`` input
(:func:`mimo_builder._internal.kinds.costs.norm_cost`: whole on every TP rank without sequence parallelism).

On MCore's training path (``use_mem_eff_path``, built where it runs: on CPU, and on CUDA with
causal-conv1d), the fused ``mamba_split_conv1d_scan_combined`` keeps its input ``zxBCdt``
(``2d + 2gn + nh``) and the scan's output ``y`` (``d``) and recomputes the rest; the gated RMSNorm
keeps ``y`` again and fp32 statistics per group, ``out_proj`` its input: ``5d + 2gn + nh``.

On the other path (CUDA without causal-conv1d) the kernels run one by one:

- the causal convolution's input ``xBC`` (``d + 2gn``; causal-conv1d's function keeps its input);
- the SSD scan (``mamba_chunk_scan_combined`` keeps its output ``y``, ``x``, ``dt``, ``B``, ``C``
  and the fp32 ``dA_cumsum``): ``2d + 2gn + nh`` plus ``nh`` fp32; the chunk states are
  recomputed in its backward, not kept;
- the gated RMSNorm (``y`` and ``z`` again, re-laid out, plus fp32 statistics per group) and the
  ``out_proj`` input: ``3d``.

There the mixer keeps ``6d + 4gn + nh`` elements per token besides the norm. Attention (``*``), MLP (``-``) and expert
(``E``) layers are MCore's transformer pieces (:mod:`mimo_builder._internal.kinds.costs`). FLOPs: the two
projections, the depthwise convolution and the chunked scan (per head and token ``2Q(n + p) +
4np`` for chunk size ``Q``, head dim ``p``; the Mamba-2 paper's SSD algorithm).
"""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.transformer import padded_vocab_size

CHUNK_SIZE = 128  # MambaMixer's default SSD chunk size
CONV_WIDTH = 4  # MambaMixer's default d_conv


def mamba_layer_cost(shape: costs.Shape, cfg, config: TransformerConfig) -> costs.LayerCost:
    """One Mamba-2 layer (norm + MambaMixer) of the config ``cfg`` (a MambaConfig)."""
    h, heads, head_dim = cfg.hidden_size, cfg.mamba_heads, cfg.mamba_head_dim
    inner, groups_state = heads * head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
    norm = costs.norm_cost(shape, config, costs.builds_te(cfg.impl))
    if getattr(config, "use_mamba_mem_eff_path", False):  # the fused conv + scan: zxBCdt in, y out
        kept = shape.sharded(5 * inner + 2 * groups_state + heads)
        stats = shape.sharded(cfg.mamba_num_groups, costs.FP32)
    else:
        kept = shape.sharded(6 * inner + 4 * groups_state + heads)
        stats = shape.sharded(heads + cfg.mamba_num_groups, costs.FP32)
    projections = h * (2 * inner + 2 * groups_state + heads) + inner * h
    conv = (inner + 2 * groups_state) * CONV_WIDTH
    scan = heads * (CHUNK_SIZE * (cfg.mamba_state_dim + head_dim) + 2 * cfg.mamba_state_dim * head_dim)
    return costs.LayerCost(norm + kept + stats, shape.matmul_flops(projections + conv + scan), shape.replicated(h))


def layer_cost(symbol: str, shape: costs.Shape, cfg, config: TransformerConfig) -> costs.LayerCost:
    """The cost of one layer of the hybrid pattern."""
    te = costs.builds_te(cfg.impl)
    if symbol == "M":
        return mamba_layer_cost(shape, cfg, config)
    if symbol == "*":
        return costs.attention_cost(shape, config, te, rope=cfg.position_embedding_type == "rope",
                                   flash=costs.flash_attention(cfg.impl))
    if symbol == "E":
        return costs.mlp_cost(shape, config, te, cfg.moe_ffn_hidden_size or config.ffn_hidden_size,
                              tokens_share=cfg.moe_router_topk)
    return costs.mlp_cost(shape, config, te)


def stage_patterns(cfg, stages: int) -> list[str]:
    """The layer symbols of each virtual stage: the '|' segments, else an even split."""
    if "|" in cfg.hybrid_layer_pattern:
        return cfg.hybrid_layer_pattern.split("|")
    symbols = cfg.layer_symbols
    counts = costs.even_split(len(symbols), stages)
    starts = [sum(counts[:k]) for k in range(stages)]
    return [symbols[start:start + count] for start, count in zip(starts, counts)]


def hybrid_stage_costs(cfg, config: TransformerConfig, micro_batch: int, tokens: int) -> list[costs.StageCost]:
    """Per virtual stage: its layers, the embedding's dropout mask on the first, the final norm,
    output layer and fp32 cross-entropy softmax on the last."""
    shape = costs.Shape.of(config, micro_batch, tokens)
    patterns = stage_patterns(cfg, costs.virtual_stage_count(config))
    vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, shape.tp)
    head_bytes, head_flops = costs.output_cost(shape, config, costs.builds_te(cfg.impl), vocab)
    embedding_mask = shape.replicated(cfg.hidden_size, 1) if cfg.hidden_dropout > 0 else 0
    last = len(patterns) - 1
    return [costs.stage_cost(config, [layer_cost(s, shape, cfg, config) for s in pattern],
                             (embedding_mask if k == 0 else 0) + (head_bytes if k == last else 0),
                             head_flops if k == last else 0)
            for k, pattern in enumerate(patterns)]
