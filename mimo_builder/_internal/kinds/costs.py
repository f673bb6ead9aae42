"""Activation memory and FLOPs of MCore's generic layers, for the dry-run plan's estimates.

Counts follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), section 4: a transformer layer keeps ``s*b*h*(34 + 5*a*s/h)`` bytes
for backward in 16-bit activations with dropout (``/t`` in the tensor-parallel regions, ``/t``
everywhere with sequence parallelism, only the layer input under full recomputation, no ``s^2``
term under selective recomputation). Here each term is one tensor MCore's layer keeps, sized by
the config (activation dtype, GQA, MLP width and gating, dropout on or off), so the paper's
numbers are the special case ``f = 4h``, 2-byte activations, dropout > 0. Attention is
Transformer Engine's flash attention (q, k, v, output and the softmax statistics) when the node
builds with TE; PyTorch's SDPA (``impl: sdpa``, or ``auto`` on CUDA without TE) keeps the same
without fused norms, plus grouped keys and values expanded to every head; else MCore's local
unfused attention (q, k, v expanded to every head and the ``a * s^2`` probabilities). FLOPs are forward matrix-multiply FLOPs (2 per multiply-add),
attention scores over the full ``s x s`` matrix (no causal halving), as Megatron counts them.

Shapes are per microbatch: ``batch`` samples of ``tokens`` tokens each; memory is per rank,
FLOPs for the whole layer (every TP/CP rank together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimo_builder._internal.kinds.transformer import te_available
from megatron.core.transformer import TransformerConfig

FP32 = 4


@dataclass(frozen=True)
class StageCost:
    """One microbatch through one virtual pipeline stage of a node."""

    activation_bytes: int
    """Bytes kept for backward on one rank of the stage until that microbatch's backward."""

    forward_flops: int
    """Forward matmul FLOPs of the whole stage (all its TP/CP ranks together)."""

    recompute_flops: int = 0
    """Forward FLOPs run again during backward (activation recomputation)."""


@dataclass(frozen=True)
class LayerCost:
    """One layer: bytes it keeps on one rank, forward FLOPs, the bytes of its input on one rank
    (all a fully recomputed layer keeps) and FLOPs that selective recomputation repeats."""

    saved: int
    flops: int
    input: int
    recomputed: int = 0


@dataclass(frozen=True)
class Shape:
    """A microbatch on one rank: sizes and how tensors split over TP/CP."""

    batch: int
    tokens: int
    element: int
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @classmethod
    def of(cls, config: TransformerConfig, batch: int, tokens: int) -> "Shape":
        """The shape of ``batch`` samples of ``tokens`` tokens under ``config``'s dtype, TP, CP and sequence parallelism."""
        return cls(batch, tokens, torch.empty((), dtype=config.params_dtype).element_size(),
                   config.tensor_model_parallel_size, config.context_parallel_size, config.sequence_parallel)

    @property
    def local_tokens(self) -> float:
        """Tokens per sample on one CP rank."""
        return self.tokens / self.cp

    def sharded(self, width: float, element: int | None = None) -> int:
        """Bytes of a [tokens, batch, width] tensor split over TP (column-parallel outputs)."""
        return int(self.batch * self.local_tokens * width * (element or self.element) / self.tp)

    def replicated(self, width: float, element: int | None = None) -> int:
        """Bytes of a [tokens, batch, width] tensor in a norm/dropout region: whole on every TP
        rank, split over TP with sequence parallelism."""
        split = self.tp if self.sequence_parallel else 1
        return int(self.batch * self.local_tokens * width * (element or self.element) / split)

    def matmul_flops(self, weights: float) -> int:
        """Forward FLOPs of multiplying every token by ``weights`` parameters."""
        return int(2 * self.batch * self.tokens * weights)


def builds_te(impl: str) -> bool:
    """Whether a node with this ``impl`` ('te', 'local', 'auto') builds Transformer Engine layers
    (fused attention without ``s^2`` probabilities, fused norms); 'auto': TE when importable with
    a GPU on the machine that plans, so plan with ``impl: te`` for a TE run elsewhere."""
    return impl == "te" or (impl == "auto" and te_available())


def local_sdpa(impl: str) -> bool:
    """Whether a node with this ``impl`` built with MCore's local layers computes core attention
    through PyTorch's SDPA: 'sdpa', and 'auto' on a machine with CUDA."""
    return impl == "sdpa" or (impl == "auto" and torch.cuda.is_available())


def flash_attention(impl: str) -> bool:
    """Whether a node with this ``impl`` computes attention without keeping ``s^2``
    probabilities: Transformer Engine's fused attention, or SDPA's flash / memory-efficient
    kernels (:func:`local_sdpa`)."""
    return builds_te(impl) or local_sdpa(impl)


def norm_cost(shape: Shape, config: TransformerConfig, fused: bool, with_output: bool = True) -> int:
    """Bytes a norm keeps, with its output (the next linear's input) unless ``with_output`` is
    False. LayerNorm (torch's or TE's kernel) keeps its input and two statistics; a fused RMSNorm
    (TE) its input and one; the local spec's torch RMSNorm runs as separate ops in fp32 and keeps
    two fp32 copies."""
    h = config.hidden_size
    output = shape.replicated(h) if with_output else 0
    if config.normalization == "LayerNorm":
        return shape.replicated(h) + shape.replicated(2) + output
    if fused:
        return shape.replicated(h) + shape.replicated(1, FP32) + output
    return 2 * shape.replicated(h, FP32) + shape.replicated(1, FP32) + output


def attention_cost(shape: Shape, config: TransformerConfig, te: bool, causal: bool = True,
                   rope: bool = False, flash: bool | None = None) -> LayerCost:
    """Norm, QKV projection, core attention and output projection of one self-attention layer.

    ``te``: Transformer Engine's layers, whose fused attention keeps q, k, v, the output and fp32
    softmax statistics. Otherwise MCore's local layers keep the QKV projection's output, rotated
    copies of q and k with rotary embeddings and k and v expanded to every head with grouped
    queries; then ``flash`` (:func:`flash_attention`; default: ``te``) core attention adds the
    softmax statistics (its output takes the place of the local path's context copy), MCore's
    local one the softmax probabilities (fp32 and a copy in the activation dtype when
    ``attention_softmax_in_fp32``) and a causal mask.
    """
    h, heads = config.hidden_size, config.num_attention_heads
    kv = config.kv_channels or h // heads
    groups = config.num_query_groups or heads
    qkv = (heads + 2 * groups) * kv
    probs_elems = shape.batch * heads * shape.local_tokens * shape.tokens / shape.tp
    selective = _selective(config)
    flash = te if flash is None else flash
    if te:
        core = shape.sharded(qkv + heads * kv) + int(probs_elems / shape.tokens * FP32)
    else:
        core = shape.sharded(qkv + (heads + groups) * kv * rope + 2 * heads * kv * (groups < heads))
        if flash:  # its output takes the place of the local path's context copy
            core += int(probs_elems / shape.tokens * FP32)
        elif not selective:
            fp32_copy = FP32 if config.attention_softmax_in_fp32 and shape.element < FP32 else 0
            dropped = 1 + shape.element if config.attention_dropout > 0 else 0  # mask and dropped copy
            core += int(probs_elems * (shape.element + fp32_copy + dropped))
            core += int(shape.local_tokens * shape.tokens) if causal else 0
    dropout = shape.replicated(h, 1) if config.hidden_dropout > 0 else 0
    proj_input = shape.sharded(heads * kv)
    core_flops = 2 * 2 * shape.batch * shape.tokens * shape.tokens * heads * kv  # QK^T and AV
    flops = shape.matmul_flops(h * qkv + heads * kv * h) + core_flops
    return LayerCost(norm_cost(shape, config, te) + core + proj_input + dropout, flops, shape.replicated(h),
                     core_flops if selective else 0)


def mlp_cost(shape: Shape, config: TransformerConfig, te: bool, ffn: int | None = None,
             tokens_share: float = 1.0) -> LayerCost:
    """Norm, fc1, activation and fc2 of one MLP layer (``tokens_share``: routed copies per token,
    for expert layers): fc1's output and the activation's output, split over TP."""
    h = config.hidden_size
    ffn = ffn or config.ffn_hidden_size
    fc1 = ffn * (2 if config.gated_linear_unit else 1)
    inner = tokens_share * (shape.sharded(fc1) + shape.sharded(ffn))
    dropout = shape.replicated(h, 1) if config.hidden_dropout > 0 else 0
    return LayerCost(int(norm_cost(shape, config, te) + inner + dropout),
                     int(tokens_share * shape.matmul_flops(h * fc1 + ffn * h)), shape.replicated(h))


def transformer_layer_cost(shape: Shape, config: TransformerConfig, te: bool, causal: bool = True,
                           rope: bool = False, flash: bool | None = None) -> LayerCost:
    """One pre-norm transformer layer: attention then MLP (Korthikanti et al.'s layer)."""
    attention, mlp = attention_cost(shape, config, te, causal, rope, flash), mlp_cost(shape, config, te)
    return LayerCost(attention.saved + mlp.saved, attention.flops + mlp.flops, attention.input,
                     attention.recomputed)


def output_cost(shape: Shape, config: TransformerConfig, te: bool, vocab: int) -> tuple[int, int]:
    """(bytes, FLOPs) of the final norm, the output layer and the vocab-parallel cross entropy
    (which keeps the softmax in fp32) for ``vocab`` (padded) entries."""
    saved = norm_cost(shape, config, te) + shape.sharded(vocab, FP32)
    return saved, shape.matmul_flops(config.hidden_size * vocab)


def stage_cost(config: TransformerConfig, layers: list[LayerCost], extra_bytes: int = 0,
               extra_flops: int = 0) -> StageCost:
    """A stage of ``layers`` plus work outside them, under the config's recomputation.

    Full recomputation keeps each recomputed unit's input only, plus one unit rebuilt during its
    backward; its forward FLOPs are repeated. ``uniform`` groups ``recompute_num_layers`` layers
    per unit, ``block`` recomputes the first ``recompute_num_layers`` layers of the stage one by one.
    """
    flops = extra_flops + sum(layer.flops for layer in layers)
    if config.recompute_granularity != "full" or not layers:
        kept = sum(layer.saved for layer in layers)
        return StageCost(extra_bytes + kept, flops, sum(layer.recomputed for layer in layers))
    count = config.recompute_num_layers or 1
    if config.recompute_method == "block":
        units, rest = [[layer] for layer in layers[:count]], layers[count:]
    else:
        units, rest = [layers[i:i + count] for i in range(0, len(layers), count)], []
    kept = sum(unit[0].input for unit in units) + sum(layer.saved for layer in rest)
    rebuilt = max(sum(layer.saved for layer in unit) for unit in units) if units else 0
    repeated = sum(layer.flops for unit in units for layer in unit)
    return StageCost(extra_bytes + kept + rebuilt, flops, repeated)


def passes(backward: bool, frozen: bool) -> int:
    """Forward-equivalents per microbatch: 3 for a trained node (forward, input and weight
    gradients), 2 for a frozen node that passes gradients on, 1 without backward."""
    return 1 if not backward else (2 if frozen else 3)


def step_flops(stages: list[StageCost], passes: int, num_microbatches: int, replicas: int) -> int:
    """A node's FLOPs per training step, every rank together: its stages' forward FLOPs per
    microbatch times ``passes``, plus what recomputation repeats, over the microbatches and the
    data-parallel ``replicas``."""
    per_microbatch = sum(s.forward_flops * passes + (s.recompute_flops if passes > 1 else 0) for s in stages)
    return per_microbatch * num_microbatches * replicas


def even_split(num_layers: int, stages: int) -> list[int]:
    """Layers per virtual stage when MCore splits ``num_layers`` evenly."""
    per = math.ceil(num_layers / stages)
    return [max(0, min(per, num_layers - k * per)) for k in range(stages)]


def virtual_stage_count(config: TransformerConfig) -> int:
    """Virtual pipeline stages of a node: pp x vp."""
    return config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)


def _selective(config: TransformerConfig) -> bool:
    modules = config.recompute_modules or ["core_attn"]
    return config.recompute_granularity == "selective" and "core_attn" in modules
