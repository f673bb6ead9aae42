"""The GPT language model node's config: its fields and their checks, as pure data (pydantic only).

It lives apart from its builder (:mod:`submodels.gpt`) so the document's JSON Schema
(``mimo-builder schema``) imports neither torch nor Megatron-Core; the entry-point group
``mimo_builder.configs`` names it.
"""

from __future__ import annotations

from typing import Literal


from mimo_builder._internal.document.types import PositiveInt, StrictBool
from mimo_builder._internal.kinds.transformer_fields import TransformerModelConfig

class GPTConfig(TransformerModelConfig):
    """A GPT language model."""

    builder: str = "gpt"
    """Builder of this node (registered name or 'module:Class')."""

    vocab_size: PositiveInt
    """Tokenizer vocabulary size (padded for TP at build time)."""

    make_vocab_size_divisible_by: PositiveInt = 128
    """Pad the vocabulary to a multiple of this times TP."""

    seq_length: PositiveInt
    """Maximum sequence length."""

    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "rope"
    """How positions are encoded."""

    share_embeddings_and_output_weights: StrictBool = True
    """Tie the output layer to the input embedding."""
