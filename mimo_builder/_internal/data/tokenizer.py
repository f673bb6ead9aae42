"""A stand-in tokenizer: UTF-8 bytes, shifted past a few reserved ids.

Any object with ``encode(text) -> list[int]`` and ``pad_id`` / ``eos_id`` attributes serves the
collator (a Hugging Face tokenizer through :class:`HFTokenizer`). The byte tokenizer needs no
files: its vocabulary is ``256 + reserved`` ids, ids below ``reserved`` are free for padding,
end of sequence and the backbone's modality placeholders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mimo_builder._internal.errors import ConfigError, DependencyError


@dataclass(frozen=True)
class ByteTokenizer:
    """Byte ``b`` is id ``reserved + b``. ``pad_id`` and ``eos_id`` must be below ``reserved``."""

    reserved: int = 4
    pad_id: int = 0
    eos_id: int | None = 3

    def __post_init__(self):
        for name in ("pad_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.reserved:
                raise ValueError(f"ByteTokenizer.{name}={value} must be a reserved id in [0, {self.reserved})")

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus the reserved ids."""
        return 256 + self.reserved

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s UTF-8 bytes."""
        return [self.reserved + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        """The text of ``ids``, reserved ids dropped and invalid UTF-8 replaced."""
        return bytes(i - self.reserved for i in ids if i >= self.reserved).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers.AutoTokenizer.from_pretrained(local_dir)``) as the
    collator expects it: text without special tokens, its pad and end-of-sequence ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        """The text of ``ids``, as the wrapped tokenizer decodes it."""
        return self.tokenizer.decode(list(ids))


def load_tokenizer(folder: str) -> HFTokenizer:
    """The Hugging Face tokenizer in ``folder`` (``--tokenizer DIR``; nothing is downloaded)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--tokenizer {folder!r} is not a folder (a Hugging Face tokenizer's files; "
                          f"nothing is downloaded)")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise DependencyError(f"--tokenizer needs the transformers package ({e}): pip install transformers") from e
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except Exception as err:  # whatever the folder holds: named, not a traceback
        raise ConfigError(f"--tokenizer {folder}: loading it raised {type(err).__name__}: {err}") from None
