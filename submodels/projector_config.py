"""The projector node's config: its fields and their checks, as pure data (pydantic only).

It lives apart from its builder (:mod:`submodels.projector`) so the document's JSON Schema
(``mimo-builder schema``) imports neither torch nor Megatron-Core; the entry-point group
``mimo_builder.configs`` names it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mimo_builder._internal.document.options import TransformerOptions
from mimo_builder._internal.document.types import PositiveInt
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.kinds.transformer_fields import OWNED_OPTIONS

class ProjectorConfig(ModelConfig):
    """A one- or two-layer projection between a modality encoder and a language model.

    Not a TransformerModelConfig: a projector has no layers, heads or attention, so those keys
    would be meaningless in its document. MCore still wants a TransformerConfig; the fixed
    properties below give :func:`make_transformer_config` what it reads.
    """

    builder: str = "projector"
    """Builder of this node (registered name or 'module:Class')."""

    input_size: PositiveInt
    """Features per input token (the encoder's hidden size)."""

    output_size: PositiveInt
    """Features per output token (the language model's hidden size)."""

    ffn_hidden_size: PositiveInt | None = None
    """Width of the 'mlp' projector's hidden layer (None: output_size)."""

    projector_type: Literal["mlp", "affine"] = "mlp"
    """'mlp': linear, activation, linear; 'affine': one linear layer."""

    activation: Literal["gelu", "relu", "silu", "relu2"] = "gelu"
    """Activation between the two linears of the 'mlp' projector ('relu2': squared ReLU)."""

    norm: Literal["none", "rmsnorm"] = "none"
    """A norm over each (merged) input token before the first linear: 'rmsnorm' as
    Nemotron-Omni's projectors (plain torch, replicated on the TP ranks)."""

    norm_epsilon: float = 1e-5
    """Epsilon of the 'rmsnorm' norm."""

    hf_format: Literal["llava", "nemotron_omni_vision", "nemotron_omni_audio"] = "llava"
    """Which Hugging Face projector the node reads and writes: LLaVA's ``multi_modal_projector``,
    or Nemotron-Omni's image (``mlp1``) or audio (``sound_projection``) projector."""

    token_reduction: PositiveInt = 1
    """Merge this many consecutive tokens (features concatenated) before projecting."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype; bf16/fp16 wrap the model in MCore's Float16Module."""

    impl: Literal["auto", "te", "local"] = "auto"
    """Linear implementation: Transformer Engine ('te'), MCore-local ('local'), or TE when importable."""

    transformer: TransformerOptions = Field(default_factory=dict)
    """Any other TransformerConfig option (e.g. add_bias_linear, init_method_std), by MCore name."""

    # What make_transformer_config reads from a transformer node, fixed for a projector.
    num_layers = property(lambda self: 1)
    num_attention_heads = property(lambda self: 1)
    num_query_groups = property(lambda self: None)
    hidden_dropout = property(lambda self: 0.0)
    attention_dropout = property(lambda self: 0.0)

    @property
    def hidden_size(self) -> int:
        """MCore's name for the projection's output width."""
        return self.output_size

    @property
    def ffn_width(self) -> int:
        """Hidden width of the 'mlp' projector."""
        return self.ffn_hidden_size or self.output_size

    @model_validator(mode="after")
    def _check_transformer_options(self) -> "ProjectorConfig":
        owned = sorted(set(self.transformer) & (OWNED_OPTIONS | {"activation_func"}))
        if owned:
            raise ValueError(f"transformer: {owned} are set by named fields, by the node's placement or by "
                             "the runtime, not in the transformer dict")
        return self

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Whole (in, out) features of the projector's linears, by module name."""
        if self.projector_type == "affine":
            return {"encoder": (self.input_size, self.output_size)}
        return {"linear_fc1": (self.input_size, self.ffn_width), "linear_fc2": (self.ffn_width, self.output_size)}

    def tp_problems(self, tp: int) -> list[str]:
        """Why this projector cannot be split over ``tp`` ranks (empty when it can)."""
        if self.projector_type == "mlp" and self.ffn_width % tp:
            return [f"ffn_hidden_size {self.ffn_width} is not divisible by tp {tp}"]
        if self.projector_type == "affine" and self.output_size % tp:
            return [f"output_size {self.output_size} is not divisible by tp {tp}"]
        return []
