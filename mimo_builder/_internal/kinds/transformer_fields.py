"""The fields every node built from MCore transformer blocks shares, as pure data.

Light on purpose (pydantic only: MCore's TransformerConfig is named, not imported), so the
document's JSON Schema needs neither torch nor Megatron-Core; building the TransformerConfig
from these fields is :mod:`mimo_builder._internal.kinds.transformer`'s matter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mimo_builder._internal.document.options import TransformerOptions
from mimo_builder._internal.document.types import PositiveInt
from mimo_builder._internal.kinds.config import ModelConfig

# Options owned by named fields, by the process groups or by the runtime; refused in the passthrough
# dict. (The runtime weighs losses per token itself and relies on DDP's mean over DP x CP, which
# calculate_per_token_loss would turn off: runtime/loss_tokens.py.)
OWNED_OPTIONS = {
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "bf16", "fp16", "params_dtype", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
    "calculate_per_token_loss",
}


class TransformerModelConfig(ModelConfig):
    """Fields common to nodes built from MCore transformer blocks."""

    num_layers: PositiveInt
    """Number of layers (for a hybrid backbone: length of the layer pattern without '|')."""

    hidden_size: PositiveInt
    """Model width."""

    num_attention_heads: PositiveInt
    """Attention heads; must divide hidden_size and be divisible by TP."""

    num_query_groups: PositiveInt | None = None
    """Key/value head groups for grouped-query attention (None: one per head)."""

    ffn_hidden_size: PositiveInt | None = None
    """MLP width (None: 4 * hidden_size)."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype; bf16/fp16 wrap the model in MCore's Float16Module."""

    impl: Literal["auto", "te", "local", "sdpa"] = "auto"
    """Layer implementation: Transformer Engine ('te'); MCore's local layers with their own attention
    ('local') or with PyTorch's scaled_dot_product_attention ('sdpa': flash kernels on CUDA);
    'auto': TE when importable, else 'sdpa' on CUDA and 'local' on CPU."""

    hidden_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Dropout after attention/MLP blocks."""

    attention_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Dropout on attention probabilities."""

    transformer: TransformerOptions = Field(default_factory=dict)
    """Any other TransformerConfig option, by its MCore field name."""

    def model_post_init(self, __context: Any) -> None:
        """Refuse owned options in ``transformer`` and head counts that do not divide evenly."""
        owned = sorted(set(self.transformer) & OWNED_OPTIONS)
        if owned:
            raise ValueError(f"transformer: {owned} are set by named fields, by the node's placement or by "
                             "the runtime, not in the transformer dict")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_query_groups {self.num_query_groups}")

    def tp_problems(self, tp: int) -> list[str]:
        """Why this config cannot be split over ``tp`` ranks (empty when it can)."""
        out = []
        if self.num_attention_heads % tp:
            out.append(f"num_attention_heads {self.num_attention_heads} is not divisible by tp {tp}")
        groups = self.num_query_groups or self.num_attention_heads
        if groups % tp:
            out.append(f"num_query_groups {groups} is not divisible by tp {tp}")
        return out

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Whole (in, out) features of each layer's attention and MLP linears, by module name."""
        heads, hidden = self.num_attention_heads, self.hidden_size
        groups = self.num_query_groups or heads
        kv = self.transformer.get("kv_channels") or hidden // heads
        ffn = self.ffn_hidden_size or 4 * hidden
        gates = 2 if self.transformer.get("gated_linear_unit") else 1
        return {"linear_qkv": (hidden, (heads + 2 * groups) * kv), "linear_proj": (heads * kv, hidden),
                "linear_fc1": (hidden, gates * ffn), "linear_fc2": (ffn, hidden)}
