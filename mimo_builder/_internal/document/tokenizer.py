"""The graph's tokenizer, as document data: ``tokenizer: {hf: DIR}`` or ``tokenizer: {bytes: {}}``.

``--data``, ``--eval-data`` and ``generate`` use it unless the data brings its own; ``validate``
checks the text node's ``vocab_size`` against it; placeholder ids may name their token
(``modality_token_ids: {image: "<image>"}``); ``export`` copies a Hugging Face tokenizer next to
the weights. Loading it is :mod:`mimo_builder._internal.data.graph_tokenizer`'s matter.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from mimo_builder._internal.document.types import NonNegativeInt, PositiveInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class BytesSpec(_Strict):
    """The byte tokenizer: byte ``b`` is id ``reserved + b``."""

    reserved: PositiveInt = 4
    """Ids below the bytes, free for padding, end of sequence and modality placeholders."""
    pad_id: NonNegativeInt = 0
    """Padding id (below reserved)."""
    eos_id: NonNegativeInt | None = 3
    """End-of-sequence id (below reserved; null: none)."""


class TokenizerSpec(_Strict):
    """Exactly one of ``hf`` and ``bytes``."""

    hf: str | None = None
    """A Hugging Face tokenizer folder (loaded with AutoTokenizer, nothing downloaded)."""
    bytes: BytesSpec | None = None
    """The byte tokenizer (``{}`` for its defaults)."""

    @model_validator(mode="after")
    def _one(self) -> "TokenizerSpec":
        if (self.hf is None) == (self.bytes is None):
            raise ValueError("give exactly one of 'hf: DIR' (a Hugging Face tokenizer folder) and 'bytes: {}'")
        return self
