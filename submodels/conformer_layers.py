"""The FastConformer encoder (NVIDIA Parakeet; transformers' ``ParakeetEncoder``) as a torch module.

Log-mel ``[B, frames, n_mels]`` -> strided 2-d convolutions -> linear to ``hidden`` (times
sqrt(hidden) with ``scale_input``) -> layers of ``x + FF1/2``, ``x + relative-position
self-attention``, ``x + convolution module``, ``x + FF2/2``, LayerNorm -> ``[B, tokens, hidden]``.

Megatron-Core has no conformer layer, so the layer is assembled here from MCore's tensor-parallel
linears where they exist and plain torch elsewhere:

- **MCore** (split over the node's TP group): each feed-forward's ``linear_fc1``
  (ColumnParallelLinear) and ``linear_fc2`` (RowParallelLinear); the attention's fused
  ``linear_qkv`` and the positions' ``linear_pos`` (ColumnParallelLinear) and ``linear_proj``
  (RowParallelLinear). So each TP rank holds ``heads / tp`` heads, with their rows of the
  per-head biases ``bias_u`` and ``bias_v``.
- **Plain torch, replicated on every TP rank**: the subsampling convolutions and linear, the
  LayerNorms, and the convolution module (pointwise Conv1d, GLU, depthwise Conv1d, BatchNorm,
  SiLU, pointwise Conv1d). Depthwise convolutions and BatchNorm have no TP layer in MCore, and
  they are small next to the linears.

There is no dropout, and :class:`RunningStatsBatchNorm1d` always normalises with its running
statistics without updating them, in training too: the loss of a sample does not depend on how
samples are split into microbatches or data-parallel ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint,
                                             sharded_state_dict_default)

from submodels.conformer_config import ConformerConfig


def relative_positions(length: int, hidden: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Parakeet's relative position table ``[2 * length - 1, hidden]`` for offsets length-1 down to
    -(length-1): sin and cos of each offset times 10000^(-2i/hidden), interleaved."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hidden, 2, dtype=torch.float32, device=device) / hidden))
    offsets = torch.arange(length - 1, -length, -1, device=device).float()
    angles = offsets[:, None] * inv_freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(2 * length - 1, -1).to(dtype)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """Transformer-XL's shift of ``[B, heads, T, 2T-1]`` position scores so that column j of row i
    holds offset i - j (transformers' ``ParakeetEncoderAttention._rel_shift``)."""
    batch, heads, queries, positions = scores.shape
    padded = F.pad(scores, (1, 0)).reshape(batch, heads, -1, queries)
    return padded[:, :, 1:].reshape(batch, heads, queries, positions)


class RunningStatsBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d that normalises with its running statistics in training too and never updates
    them (nor ``num_batches_tracked``): its output does not depend on the rest of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             training=False, momentum=0.0, eps=self.eps)


class TPModule(MegatronModule):
    """A MegatronModule that keeps its TP group (MCore's sharded state dict reads it, else the
    global parallel state, which the project does not set)."""

    def __init__(self, config: TransformerConfig, tp_group):
        super().__init__(config=config)
        self.tp_group = tp_group


class FeedForward(TPModule):
    """linear_fc1 (column-parallel) -> SiLU -> linear_fc2 (row-parallel)."""

    def __init__(self, config: TransformerConfig, cfg: ConformerConfig, tp_group):
        super().__init__(config, tp_group)
        hidden, ffn = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.linear_fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=config.init_method,
                                               bias=cfg.attention_bias, gather_output=False, tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=config.output_layer_init_method,
                                            bias=cfg.attention_bias, input_is_parallel=True, skip_bias_add=False,
                                            tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden]."""
        inner, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.silu(inner))
        return out


class RelPositionAttention(TPModule):
    """Multi-head self-attention with Transformer-XL relative positions (Parakeet's): scores
    ``((q + bias_u) k^T + rel_shift((q + bias_v) p^T)) / sqrt(head_dim)``, ``p`` the projected
    position table. Heads are split over TP; ``bias_u`` and ``bias_v`` ``[heads, head_dim]`` by rows."""

    def __init__(self, config: TransformerConfig, cfg: ConformerConfig, tp_group):
        super().__init__(config, tp_group)
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim, self.local_heads = hidden // heads, heads // tp_group.size()
        column = dict(config=config, init_method=config.init_method, gather_output=False, tp_group=tp_group)
        self.linear_qkv = ColumnParallelLinear(hidden, 3 * hidden, bias=cfg.attention_bias, **column)
        self.linear_pos = ColumnParallelLinear(hidden, hidden, bias=False, **column)
        self.linear_proj = RowParallelLinear(hidden, hidden, config=config, init_method=config.output_layer_init_method,
                                             bias=cfg.attention_bias, input_is_parallel=True, skip_bias_add=False,
                                             tp_group=tp_group)
        self.bias_u = self._head_rows(heads, config)
        self.bias_v = self._head_rows(heads, config)

    def _head_rows(self, heads: int, config: TransformerConfig) -> torch.nn.Parameter:
        """This rank's rows of a [heads, head_dim] bias, drawn whole (normal, init_method_std) then sliced."""
        full = torch.empty(heads, self.head_dim, dtype=torch.float32)
        torch.nn.init.normal_(full, std=config.init_method_std)
        rank = self.tp_group.rank()
        rows = full[rank * self.local_heads:(rank + 1) * self.local_heads].to(config.params_dtype)
        param = torch.nn.Parameter(rows.contiguous())
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        return param

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] with the position table [2T-1, hidden] -> [B, T, hidden]."""
        batch, tokens, _ = x.shape
        qkv, _ = self.linear_qkv(x)  # per head: its q, k, v rows one after another
        q, k, v = qkv.view(batch, tokens, self.local_heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, -1)
        pos, _ = self.linear_pos(positions.unsqueeze(1))  # [2T-1, 1, local heads * head_dim]
        pos = pos.view(-1, self.local_heads, self.head_dim).permute(1, 2, 0)  # [heads, head_dim, 2T-1]
        scale = self.head_dim ** -0.5
        by_position = rel_shift((q + self.bias_v[:, None]) @ pos)[..., :tokens] * scale
        out = F.scaled_dot_product_attention(q + self.bias_u[:, None], k, v, attn_mask=by_position, scale=scale)
        out, _ = self.linear_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
        return out

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """MegatronModule's entries, with ``bias_u`` and ``bias_v`` split by heads over TP."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {"bias_u": self.bias_u, "bias_v": self.bias_v}
        out.update(make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in own}, sharded_offsets,
                                                       tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
        return out


class ConvolutionModule(TPModule):
    """Pointwise Conv1d to 2 x hidden, GLU, depthwise Conv1d, BatchNorm (running statistics),
    SiLU, pointwise Conv1d; plain torch, replicated on every TP rank."""

    def __init__(self, config: TransformerConfig, cfg: ConformerConfig, tp_group):
        super().__init__(config, tp_group)
        hidden, kernel, bias, dtype = cfg.hidden_size, cfg.conv_kernel_size, cfg.conv_bias, config.params_dtype
        self.pointwise_conv1 = torch.nn.Conv1d(hidden, 2 * hidden, 1, bias=bias, dtype=dtype)
        self.depthwise_conv = torch.nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2, groups=hidden,
                                              bias=bias, dtype=dtype)
        self.norm = RunningStatsBatchNorm1d(hidden, dtype=dtype)
        self.pointwise_conv2 = torch.nn.Conv1d(hidden, hidden, 1, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden]."""
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = F.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerLayer(TPModule):
    """One FastConformer block: half FF, attention, convolution module, half FF, each pre-normed
    and added to the residual, then the output LayerNorm (transformers' ``ParakeetEncoderBlock``)."""

    def __init__(self, config: TransformerConfig, cfg: ConformerConfig, tp_group, layer_number: int):
        super().__init__(config, tp_group)
        self.layer_number = layer_number  # the seeded initialisation names parameters by it
        self.feed_forward1 = FeedForward(config, cfg, tp_group)
        self.self_attn = RelPositionAttention(config, cfg, tp_group)
        self.conv = ConvolutionModule(config, cfg, tp_group)
        self.feed_forward2 = FeedForward(config, cfg, tp_group)
        for name in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            self.add_module(name, torch.nn.LayerNorm(cfg.hidden_size, eps=config.layernorm_epsilon,
                                                     dtype=config.params_dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] with the position table [2T-1, hidden] -> [B, T, hidden]."""
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), positions)
        x = x + self.conv(self.norm_conv(x))
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class Subsampling(torch.nn.Module):
    """Conv2d(1 -> C, stride) + ReLU, then per further factor of 2 a depthwise Conv2d(stride),
    a pointwise Conv2d and ReLU, over [frames, mels]; then [B, C, T', F'] -> [B, T', C * F'] ->
    Linear to hidden. Plain torch, replicated on every TP rank; module indices as transformers'."""

    def __init__(self, cfg: ConformerConfig, dtype: torch.dtype):
        super().__init__()
        k, stride, channels = cfg.subsampling_kernel_size, cfg.subsampling_stride, cfg.subsampling_channels
        strided = dict(kernel_size=k, stride=stride, padding=(k - 1) // 2, dtype=dtype)
        layers = [torch.nn.Conv2d(1, channels, **strided), torch.nn.ReLU()]
        for _ in range(cfg.subsampling_layers - 1):
            layers += [torch.nn.Conv2d(channels, channels, groups=channels, **strided),
                       torch.nn.Conv2d(channels, channels, kernel_size=1, dtype=dtype), torch.nn.ReLU()]
        self.layers = torch.nn.ModuleList(layers)
        self.linear = torch.nn.Linear(channels * cfg.subsampled(cfg.n_mels), cfg.hidden_size, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, frames, n_mels] -> [B, tokens, hidden]."""
        x = features.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return self.linear(x.transpose(1, 2).flatten(2))


class ConformerEncoder(TPModule):
    """Log-mel [B, frames, n_mels] -> [B, tokens, hidden] (module docstring: which parts are MCore)."""

    def __init__(self, config: TransformerConfig, cfg: ConformerConfig, pg_collection):
        super().__init__(config, pg_collection.tp)
        self.input_scale = math.sqrt(cfg.hidden_size) if cfg.scale_input else 1.0
        self.subsampling = Subsampling(cfg, config.params_dtype)
        self.layers = torch.nn.ModuleList(ConformerLayer(config, cfg, self.tp_group, i + 1)
                                          for i in range(cfg.num_layers))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, tokens, hidden] of log-mel ``features`` [B, frames, n_mels]."""
        x = self.subsampling(features) * self.input_scale
        positions = relative_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, positions)
        return x

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each layer's own entries (MCore's default would take the layer list whole, as
        replicated), the subsampling's replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = sharded_state_dict_default(self.subsampling, f"{prefix}subsampling.", sharded_offsets, metadata,
                                         tp_group=self.tp_group)
        for i, layer in enumerate(self.layers):
            out.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        return out
