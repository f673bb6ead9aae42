"""``generate --prompt TEXT [--image PATH ...] [--audio PATH ...]``: one prompt as a one-sample dataset.

Images are read from files (PNG, JPEG, ... through PIL) for the node bound to a ``pixel_values``
port: resized to multiples of its patch up to its largest size and normalised with its config's
``image_mean`` and ``image_std`` (CLIP's by default) (:func:`~mimo_builder._internal.data.llava.read_image`). Audio is a
feature file for the node bound to a ``features`` port: ``.npy`` or ``.pt`` holding
``[frames, mels]`` (the log-mel spectrogram the audio kind takes). Without tags in the text, one
``<image>`` per image and one ``<audio>`` per clip go before it. With a tokenizer that has a chat
template, or ``chat``, the text is a user turn of a conversation (the plain template otherwise);
else it is the raw prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.validation import ValidGraph

FEATURE_SUFFIXES = (".npy", ".pt")


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to answer, with the image and audio files that go with it."""

    text: str
    images: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()
    chat: bool = False

    def check(self) -> None:
        """A ConfigError naming the flag for a missing file or an audio file of another kind."""
        for flag, paths in (("--image", self.images), ("--audio", self.audio)):
            for path in paths:
                if not Path(path).is_file():
                    raise ConfigError(f"generate {flag} {path}: no such file")
        for path in self.audio:
            if Path(path).suffix not in FEATURE_SUFFIXES:
                raise ConfigError(f"generate --audio {path}: give the clip's log-mel features [frames, mels] as a "
                                  f"{' or '.join(FEATURE_SUFFIXES)} file")

    def sample(self, valid: ValidGraph, tokenizer) -> dict:
        """The sample: the items under the graph's keys, the text as a prompt or a user turn."""
        self.check()
        sample: dict = {}
        text = self.text
        if self.images:
            key, config = _bound(valid, "pixel_values", "--image")
            sample[key] = [_image(path, config) for path in self.images]
            text = _tagged(text, "<image>", len(self.images))
        if self.audio:
            key, _ = _bound(valid, "features", "--audio")
            sample[key] = [_features(path) for path in self.audio]
            text = _tagged(text, "<audio>", len(self.audio))
        hf = getattr(tokenizer, "tokenizer", None)
        if self.chat or getattr(hf, "chat_template", None):
            sample["messages"] = [{"role": "user", "content": text}]
        else:
            sample["prompt"] = text
        return sample


def _tagged(text: str, tag: str, count: int) -> str:
    """``text`` with ``count`` tags before it, unless it names them itself."""
    return text if tag in text else tag * count + "\n" + text


def _bound(valid: ValidGraph, port: str, flag: str):
    """(batch key, node config) of the graph's one input bound to a node's ``port``."""
    found = [(key, valid.configs[node]) for key, (node, p) in valid.inputs.items() if p == port]
    if len(found) != 1:
        raise ConfigError(f"generate {flag}: the graph binds {len(found)} inputs to a node's '{port}' port; "
                          f"{flag} needs exactly one")
    return found[0]


def _image(path: str, config) -> torch.Tensor:
    from mimo_builder._internal.data.llava import read_image

    return read_image(path, f"--image {path}", **image_processing(config))


def image_processing(config) -> dict:
    """How image files are read for a vision node: its patch, largest size, channels and, where
    its config says, its normalisation (else CLIP's)."""
    channels = getattr(config, "num_channels", 3)
    out = dict(patch_size=config.patch_size, max_size=getattr(config, "max_image_size", None) or config.image_size,
               num_channels=channels)
    for name, key in (("image_mean", "mean"), ("image_std", "std")):
        values = getattr(config, name, None)
        if values is not None:
            out[key] = tuple(values) * channels if len(values) == 1 else tuple(values)
    return out


def _features(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        import numpy as np

        value = np.load(path, allow_pickle=False)
    else:
        value = torch.load(path, weights_only=True)
    return torch.as_tensor(value, dtype=torch.float32)
