"""The conformer audio encoder node's config: its fields and their checks, as pure data (pydantic only).

A FastConformer (NVIDIA Parakeet; transformers' ``ParakeetEncoder``): strided 2-d convolutions
subsample log-mel frames, then each layer is half a feed-forward, self-attention with relative
positions, a convolution module and another half feed-forward. It lives apart from its builder
(:mod:`submodels.conformer`) so the document's JSON Schema (``mimo-builder schema``) imports
neither torch nor Megatron-Core; the entry-point group ``mimo_builder.configs`` names it.

The node has no dropout, and its BatchNorms always normalise with their running statistics and
never update them (as in eval mode, in training too): a sample's loss then does not depend on
which other samples share its microbatch or data-parallel rank.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from mimo_builder._internal.document.types import PositiveInt, StrictBool
from mimo_builder._internal.kinds.transformer_fields import TransformerModelConfig

HONOURED_OPTIONS = frozenset({"layernorm_epsilon", "init_method_std", "perform_initialization",
                              "init_model_with_meta_device"})
"""The ``transformer`` options the conformer reads; any other would be silently ignored, so it is refused."""


class ConformerConfig(TransformerModelConfig):
    """A FastConformer audio encoder over log-mel frames (Parakeet's encoder)."""

    builder: str = "conformer"
    """Builder of this node (registered name or 'module:Class')."""

    n_mels: PositiveInt = 80
    """Mel bins per input frame."""

    max_frames: PositiveInt = 3000
    """Most input frames one clip may have (30 s of 10 ms frames); sizes synthetic inputs and the plan."""

    subsampling_factor: PositiveInt = 8
    """Frames per output token: a power of 2, one strided convolution per factor of 2."""

    subsampling_channels: PositiveInt = 256
    """Channels of the subsampling convolutions."""

    subsampling_kernel_size: PositiveInt = 3
    """Kernel size (in frames and in mels) of the strided subsampling convolutions."""

    subsampling_stride: PositiveInt = 2
    """Stride of the strided subsampling convolutions."""

    conv_kernel_size: PositiveInt = 9
    """Kernel size of each layer's depthwise convolution over tokens; odd (same padding)."""

    conv_bias: StrictBool = True
    """Biases on the convolution module's convolutions (transformers' ``convolution_bias``)."""

    attention_bias: StrictBool = True
    """Biases on the q/k/v/output projections and the feed-forward linears."""

    scale_input: StrictBool = True
    """Multiply the subsampled features by sqrt(hidden_size) before the first layer."""

    activation: Literal["silu"] = "silu"
    """Activation of the feed-forwards and the convolution module (Parakeet's; the only one)."""

    @property
    def subsampling_layers(self) -> int:
        """Strided convolutions: log2(subsampling_factor)."""
        return self.subsampling_factor.bit_length() - 1

    def subsampled_once(self, length: int) -> int:
        """``length`` frames (or mel bins) after one strided convolution:
        floor((L + 2 * ((k - 1) // 2) - k) / stride) + 1."""
        k = self.subsampling_kernel_size
        return (length + 2 * ((k - 1) // 2) - k) // self.subsampling_stride + 1

    def subsampled(self, length: int) -> int:
        """``length`` frames (or mel bins) after the log2(subsampling_factor) strided convolutions."""
        for _ in range(self.subsampling_layers):
            length = self.subsampled_once(length)
        return length

    def clip_tokens(self, frames: int) -> int:
        """Output tokens of one clip of ``frames`` frames; a ValueError outside 1..max_frames or
        for a clip too short to give a token."""
        if not 0 < frames <= self.max_frames or self.subsampled(frames) < 1:
            raise ValueError(f"a clip of {frames} frames: the encoder takes {self.min_frames} to {self.max_frames} "
                             f"frames (max_frames)")
        return self.subsampled(frames)

    @property
    def min_frames(self) -> int:
        """The fewest frames that give one output token."""
        return next(n for n in range(1, self.max_frames + 1) if self.subsampled(n) >= 1)

    @property
    def max_tokens(self) -> int:
        """Output tokens of a clip of ``max_frames`` frames."""
        return self.subsampled(self.max_frames)

    @model_validator(mode="after")
    def _check_shape(self) -> "ConformerConfig":
        problems = self._shape_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _shape_problems(self) -> list[str]:
        out = []
        if self.subsampling_factor < 2 or self.subsampling_factor & (self.subsampling_factor - 1):
            out.append(f"subsampling_factor {self.subsampling_factor} must be a power of 2 from 2 up")
        elif self.subsampled(self.n_mels) < 1:
            out.append(f"n_mels {self.n_mels} leaves no mel bin after the subsampling; raise n_mels or lower "
                       "subsampling_factor")
        elif self.subsampled(self.max_frames) < 1:
            out.append(f"max_frames {self.max_frames} gives no output token; raise it")
        if self.conv_kernel_size % 2 == 0:
            out.append(f"conv_kernel_size {self.conv_kernel_size} must be odd (same padding)")
        if self.hidden_size % 2:
            out.append(f"hidden_size {self.hidden_size} must be even (relative positions interleave sin and cos)")
        if self.num_query_groups not in (None, self.num_attention_heads):
            out.append(f"num_query_groups {self.num_query_groups}: the conformer has one key/value head per "
                       "query head; leave it unset")
        if self.hidden_dropout or self.attention_dropout:
            out.append("hidden_dropout and attention_dropout: the conformer node has no dropout; set them to 0")
        ignored = sorted(set(self.transformer) - HONOURED_OPTIONS)
        if ignored:
            out.append(f"transformer: {ignored} do not apply to the conformer (it reads only "
                       f"{sorted(HONOURED_OPTIONS)})")
        return out

    def pp_problems(self, pp: int) -> list[str]:
        """Why this encoder cannot be split over ``pp`` pipeline stages (empty when it can)."""
        return [] if pp == 1 else [f"the conformer encoder runs on one pipeline stage, not pp {pp}"]

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Whole (in, out) features of each layer's Megatron-Core linears, by module name (both
        feed-forwards name theirs linear_fc1 and linear_fc2; linear_pos projects the positions)."""
        hidden = self.hidden_size
        ffn = self.ffn_hidden_size or 4 * hidden
        return {"linear_qkv": (hidden, 3 * hidden), "linear_proj": (hidden, hidden), "linear_pos": (hidden, hidden),
                "linear_fc1": (hidden, ffn), "linear_fc2": (ffn, hidden)}
