"""``generate --prompt TEXT [--image PATH ...] [--audio PATH ...]``: one prompt as a one-sample dataset.

Images are read from files (PNG, JPEG, ... through PIL) for the node bound to a ``pixel_values``
port: resized to multiples of its patch up to its largest size and normalised with its config's
``image_mean`` and ``image_std`` (CLIP's by default) (:func:`~mimo_builder._internal.data.llava.read_image`). Audio is
for the node bound to a ``features`` port: a ``.wav`` file (PCM, read by
:func:`~mimo_builder._internal.data.wav.read_wav`), which that node's builder turns into the
log-mel it takes (``ModelBuilder.features_from_waveform``: resampled to its rate, Whisper's or
Parakeet's log-mel for the shipped kinds), or the features themselves as ``.npy`` or ``.pt``
(``[frames, mels]``, as the port takes them). Without tags in the text, one
``<image>`` per image and one ``<audio>`` per clip go before it. With a tokenizer that has a chat
template, or ``chat``, the text is a user turn of a conversation (the plain template otherwise);
else it is the raw prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimo_builder._internal.data.wav import WAV_SUFFIX, wav_features
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.validation import ValidGraph

FEATURE_SUFFIXES = (".npy", ".pt")
"""Files ``--audio`` reads as a clip's features, beside ``.wav`` files."""


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
            if Path(path).suffix.lower() not in (WAV_SUFFIX, *FEATURE_SUFFIXES):
                raise ConfigError(f"generate --audio {path}: give a {WAV_SUFFIX} file (PCM) or the clip's log-mel "
                                  f"features [frames, mels] as a {' or '.join(FEATURE_SUFFIXES)} file")

    def sample(self, valid: ValidGraph, tokenizer) -> dict:
        """The sample: the items under the graph's keys, the text as a prompt or a user turn."""
        self.check()
        sample: dict = {}
        text = self.text
        if self.images:
            key, node = _bound(valid, "pixel_values", "--image")
            sample[key] = [_image(path, valid.configs[node]) for path in self.images]
            text = _tagged(text, "<image>", len(self.images))
        if self.audio:
            key, node = _bound(valid, "features", "--audio")
            sample[key] = [_clip(path, valid.builders[node]) for path in self.audio]
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
    """(batch key, node) of the graph's one input bound to a node's ``port``."""
    found = [(key, node) for key, (node, p) in valid.inputs.items() if p == port]
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


def _clip(path: str, builder) -> torch.Tensor:
    """One ``--audio`` clip as the features ``builder``'s node takes: a ``.wav`` file through its
    front end, else a features file."""
    if Path(path).suffix.lower() != WAV_SUFFIX:
        return _features(path)
    try:
        return wav_features(path, builder)
    except ValueError as err:  # a ConfigError too: a kind without an audio front end
        raise ConfigError(f"generate --audio {path}: {err}") from None


def _features(path: str) -> torch.Tensor:
    if Path(path).suffix.lower() == ".npy":
        import numpy as np

        value = np.load(path, allow_pickle=False)
    else:
        value = torch.load(path, weights_only=True)
    return torch.as_tensor(value, dtype=torch.float32)
