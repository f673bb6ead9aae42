"""The Mamba/hybrid backbone node's config: its fields and their checks, as pure data (pydantic only).

It lives apart from its builder (:mod:`submodels.mamba`) so the document's JSON Schema
(``mimo-builder schema``) imports neither torch nor Megatron-Core; the entry-point group
``mimo_builder.configs`` names it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mimo_builder._internal.document.types import PositiveInt, StrictBool, StrictInt
from mimo_builder._internal.kinds.transformer_fields import TransformerModelConfig

LAYER_SYMBOLS = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "mixture of experts"}
PIPE = "|"


class MambaConfig(TransformerModelConfig):
    """A Mamba-2 / hybrid language model backbone."""

    builder: str = "mamba"
    """Builder of this node (registered name or 'module:Class')."""

    hybrid_layer_pattern: str
    """One symbol per layer: M Mamba-2, * attention, - MLP, E MoE; '|' splits pipeline stages."""

    vocab_size: PositiveInt
    """Tokenizer vocabulary size (padded for TP at build time)."""

    make_vocab_size_divisible_by: PositiveInt = 128
    """Pad the vocabulary to a multiple of this times TP."""

    pad_vocab: StrictBool = True
    """Pad the vocabulary (see make_vocab_size_divisible_by); false keeps vocab_size as is, like
    MCore's HybridModelConfig.should_pad_vocab=False (MCore's default)."""

    seq_length: PositiveInt
    """Maximum sequence length."""

    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "none"
    """Position encoding; Mamba layers need none, attention layers may use rope."""

    share_embeddings_and_output_weights: StrictBool = False
    """Tie the output layer to the input embedding."""

    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    """Norm used by every layer and the final norm."""

    mlp_activation: Literal["gelu", "relu", "silu", "squared_relu"] = "gelu"
    """Activation of the MLP and expert layers."""

    mamba_state_dim: PositiveInt = 128
    """SSM state size per head (d_state)."""

    mamba_head_dim: PositiveInt = 64
    """Channels per Mamba head."""

    mamba_num_groups: PositiveInt = 8
    """B/C groups; must divide the Mamba heads and be divisible by TP."""

    mamba_num_heads: PositiveInt | None = None
    """Mamba heads (None: 2 * hidden_size / mamba_head_dim)."""

    num_experts: PositiveInt | None = None
    """Experts per MoE layer; required when the pattern has 'E'."""

    moe_router_topk: PositiveInt = 2
    """Experts each token is routed to."""

    moe_ffn_hidden_size: PositiveInt | None = None
    """Expert MLP width (None: ffn_hidden_size)."""

    modality_token_ids: dict[str, StrictInt | str] = Field(default_factory=dict)
    """Input port name -> placeholder token id; that modality's embeddings replace those tokens.
    An id may be named by its token (``"<image>"``) where the graph has a tokenizer."""

    def with_token_ids(self, lookup) -> "MambaConfig":
        """Placeholder ids named by their token replaced by the ids ``lookup`` gives."""
        named = {port: token for port, token in self.modality_token_ids.items() if isinstance(token, str)}
        if not named:
            return self
        ids = {**self.modality_token_ids, **{port: lookup(token) for port, token in named.items()}}
        return type(self).model_validate({**self.model_dump(), "modality_token_ids": ids})

    @property
    def layer_symbols(self) -> str:
        """The pattern without pipeline separators."""
        return self.hybrid_layer_pattern.replace(PIPE, "")

    @property
    def mamba_heads(self) -> int:
        """Mamba heads: ``mamba_num_heads``, else 2 * hidden_size / mamba_head_dim."""
        return self.mamba_num_heads or 2 * self.hidden_size // self.mamba_head_dim

    @model_validator(mode="after")
    def _check_pattern(self) -> "MambaConfig":
        unknown = sorted(set(self.layer_symbols) - set(LAYER_SYMBOLS))
        if unknown:
            known = ", ".join(f"{k!r} {v}" for k, v in LAYER_SYMBOLS.items())
            raise ValueError(f"hybrid_layer_pattern: unknown symbol(s) {unknown}; use {known} and '|'")
        if len(self.layer_symbols) != self.num_layers:
            raise ValueError(f"hybrid_layer_pattern has {len(self.layer_symbols)} layers but num_layers is "
                             f"{self.num_layers}; make them equal")
        if "E" in self.layer_symbols and self.num_experts is None:
            raise ValueError("hybrid_layer_pattern has MoE layers ('E') but num_experts is not set")
        if self.mamba_num_heads is None and (2 * self.hidden_size) % self.mamba_head_dim:
            raise ValueError(f"2 * hidden_size ({2 * self.hidden_size}) is not divisible by mamba_head_dim "
                             f"{self.mamba_head_dim}; set mamba_num_heads or change mamba_head_dim")
        if "M" in self.layer_symbols and self.mamba_heads % self.mamba_num_groups:
            raise ValueError(f"Mamba heads {self.mamba_heads} are not divisible by mamba_num_groups "
                             f"{self.mamba_num_groups}")
        reserved = {"input_ids", "position_ids", "labels", "loss_mask"} & set(self.modality_token_ids)
        if reserved:
            raise ValueError(f"modality_token_ids: {sorted(reserved)} are the backbone's own port names")
        bad = {k: v for k, v in self.modality_token_ids.items() if isinstance(v, int) and not 0 <= v < self.vocab_size}
        if bad:
            raise ValueError(f"modality_token_ids {bad} must be token ids in [0, vocab_size={self.vocab_size})")
        return self

    def has_experts(self) -> bool:
        """Whether the pattern has MoE layers ('E')."""
        return "E" in self.layer_symbols

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Whole (in, out) features of the pattern's Mamba, attention and MLP linears, by module name."""
        inner = self.mamba_heads * self.mamba_head_dim
        mixer = 2 * inner + 2 * self.mamba_num_groups * self.mamba_state_dim + self.mamba_heads
        return {**super().linear_sizes(), "in_proj": (self.hidden_size, mixer), "out_proj": (inner, self.hidden_size)}

    def tp_problems(self, tp: int) -> list[str]:
        """Why this config cannot be split over ``tp`` ranks: attention heads and groups, Mamba heads and groups."""
        out = super().tp_problems(tp)
        if out and "*" not in self.layer_symbols:  # MCore's TransformerConfig checks the heads anyway
            out = [f"{p} (Megatron-Core requires it even without attention layers)" for p in out]
        if "M" in self.layer_symbols:
            if self.mamba_heads % tp:
                out.append(f"Mamba heads {self.mamba_heads} are not divisible by tp {tp}")
            if self.mamba_num_groups % tp:
                out.append(f"mamba_num_groups {self.mamba_num_groups} is not divisible by tp {tp}")
        return out

    def cp_problems(self, cp: int, tp: int = 1) -> list[str]:
        """Why sequences cannot be split over ``cp`` context-parallel ranks (load-balanced chunks;
        MCore's Mamba context parallelism moves heads across the CP ranks)."""
        out = []
        if self.seq_length % (2 * cp):
            out.append(f"seq_length {self.seq_length} is not divisible by 2 * cp = {2 * cp} (each sequence "
                       "is cut into 2 * cp equal chunks)")
        if "M" in self.layer_symbols and self.mamba_heads % (tp * cp):
            out.append(f"Mamba heads {self.mamba_heads} are not divisible by tp * cp = {tp * cp}")
        groups = self.mamba_num_groups // tp if self.mamba_num_groups % tp == 0 else 0
        if "M" in self.layer_symbols and groups and (groups % cp if groups >= cp else cp % groups):
            out.append(f"mamba_num_groups / tp = {groups} and cp {cp}: one must divide the other")
        if "*" in self.layer_symbols and self.transformer.get("window_size") is not None:
            out.append("transformer.window_size (sliding-window attention) is not supported with cp > 1")
        if self.transformer.get("sequence_parallel"):
            out.append("transformer.sequence_parallel with cp > 1 is not supported (the sequence is "
                       "split for CP before the layers)")
        return out

    def ep_problems(self, ep: int) -> list[str]:
        """Why the experts cannot be split over ``ep`` expert-parallel ranks."""
        if self.num_experts is not None and self.num_experts % ep:
            return [f"num_experts {self.num_experts} is not divisible by ep {ep}"]
        return []

    def pp_problems(self, pp: int) -> list[str]:
        """Why this pattern cannot be split over ``pp`` pipeline stages (x virtual stages)."""
        vp = self.transformer.get("virtual_pipeline_model_parallel_size") or 1
        if vp > 1 and pp == 1:
            return [f"transformer.virtual_pipeline_model_parallel_size={vp} needs pp > 1 (virtual stages "
                    "interleave pipeline ranks); set placement.pp or drop the option"]
        stages = self.hybrid_layer_pattern.count(PIPE) + 1
        if PIPE in self.hybrid_layer_pattern and stages != pp * vp:
            return [f"hybrid_layer_pattern has {stages} '|'-separated stages but pp*vp = {pp}*{vp} = {pp * vp}; "
                    "use one segment per (virtual) pipeline stage"]
        if PIPE not in self.hybrid_layer_pattern and self.num_layers % (pp * vp):
            return [f"num_layers {self.num_layers} is not divisible by pp*vp = {pp * vp}; "
                    "mark the stage boundaries with '|'"]
        return []
