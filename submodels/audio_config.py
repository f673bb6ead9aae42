"""The audio encoder node's config: its fields and their checks, as pure data (pydantic only).

It lives apart from its builder (:mod:`submodels.audio`) so the document's JSON Schema
(``mimo-builder schema``) imports neither torch nor Megatron-Core; the entry-point group
``mimo_builder.configs`` names it.
"""

from __future__ import annotations

import math
from typing import Literal


from mimo_builder._internal.document.types import PositiveInt
from mimo_builder._internal.kinds.transformer_fields import TransformerModelConfig

class AudioConfig(TransformerModelConfig):
    """A Whisper-like audio encoder over log-mel frames."""

    builder: str = "audio"
    """Builder of this node (registered name or 'module:Class')."""

    n_mels: PositiveInt = 80
    """Mel bins per input frame."""

    max_frames: PositiveInt = 3000
    """Most input frames one clip may have (30 s of 10 ms frames in Whisper); sizes the positions."""

    position_embedding_type: Literal["sinusoidal", "learned"] = "sinusoidal"
    """Fixed sinusoidal positions (Whisper) or a learned table."""

    features_layout: Literal["frames_mels", "mels_frames"] = "frames_mels"
    """Axis order of the input: [B, frames, n_mels], or Whisper's [B, n_mels, frames] (then every
    clip has max_frames frames, as Whisper pads each to 30 s)."""

    @property
    def max_tokens(self) -> int:
        """Output tokens for ``max_frames`` input frames: the stride-2 conv halves the frames."""
        return math.ceil(self.max_frames / 2)

    def pp_problems(self, pp: int) -> list[str]:
        """Why this encoder cannot be split over ``pp`` pipeline stages (empty when it can)."""
        return [] if pp == 1 else [f"the audio encoder runs on one pipeline stage, not pp {pp}"]
