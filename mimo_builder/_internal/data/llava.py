"""LLaVA-format conversations (a JSON list, or JSON Lines) as collator samples.

A record is ``{"id": ..., "image": "a.png" | ["a.png", "b.png"] (optional), "conversations":
[{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}``; it becomes
``{image_key: [tensor, ...], "messages": [{"role": "user" | "assistant" | "system", "content": ...}]}``
(no ``image_key`` for a text-only record). Each ``<image>`` tag stands for the next image in order.

- **Tags.** A record with images but no ``<image>`` tag in any turn gets ``"<image>\\n"`` put
  before its first human turn once per image (LLaVA's convention). Otherwise the turns must hold
  one tag per image.
- **Sizes** (:func:`fit_size`). An image keeps its size where it can: one scale (never above 1)
  brings its longer side within the largest multiple of ``patch_size`` not above ``max_size``;
  then each side is rounded to the nearest multiple of ``patch_size``, at least one patch and at
  most that largest multiple. Resampling is bicubic.
- **Values.** ``float32 [C, H, W]``: pixels scaled to [0, 1], then ``(x - mean) / std`` per
  channel (CLIP's values by default; a grayscale image, ``num_channels=1``, uses the first).

The file is read and checked once, at construction; images are opened when a sample is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mimo_builder._internal.errors import ConfigError, DataError, DependencyError, excerpt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's per-channel pixel mean (RGB, in [0, 1])."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's per-channel pixel standard deviation (RGB, in [0, 1])."""
IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""LLaVA's ``from`` values and the message roles they become."""
_MODES = {1: "L", 3: "RGB"}


class _Record(NamedTuple):
    name: str  # "record I (id X)", for errors
    images: tuple[str, ...]
    messages: tuple[tuple[str, str], ...]


def fit_size(width: int, height: int, patch_size: int, max_size: int) -> tuple[int, int]:
    """The (width, height) an image of ``width x height`` pixels is resized to: both multiples of
    ``patch_size``, at most the largest such multiple not above ``max_size``, at least one patch,
    the aspect ratio kept as closely as rounding to whole patches allows (never scaled up, except
    to reach one patch)."""
    largest = max_size // patch_size * patch_size
    if largest < patch_size:
        raise ConfigError(f"max_size {max_size} is smaller than one patch of {patch_size} pixels")
    scale = min(1.0, largest / max(width, height))

    def side(pixels: int) -> int:
        return min(largest, max(patch_size, math.floor(pixels * scale / patch_size + 0.5) * patch_size))

    return side(width), side(height)


class LlavaDataset:
    """A map-style dataset (``len``, ``[i]``) over a LLaVA-format ``.json`` (a list of records) or
    ``.jsonl`` (one record a line) file; image paths are relative to ``image_root`` (default: the
    file's folder). Picklable, for DataLoader workers. See the module's notes for the tag rule,
    the resize rule and the pixel values; a :class:`DataError` names the file, the record (its
    index and id) and the field at fault."""

    def __init__(self, json_path, image_root=None, *, image_key: str = "pixel_values", patch_size: int,
                 max_size: int, num_channels: int = 3, mean=CLIP_MEAN, std=CLIP_STD):
        self.path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.image_key, self.patch_size, self.max_size = image_key, patch_size, max_size
        if num_channels not in _MODES:
            raise ConfigError(f"LlavaDataset reads RGB (num_channels 3) or grayscale (1) images, not "
                              f"num_channels {num_channels}")
        if patch_size < 1 or max_size < patch_size:
            raise ConfigError(f"LlavaDataset needs 1 <= patch_size <= max_size, got patch_size {patch_size}, "
                              f"max_size {max_size}")
        self.num_channels = num_channels
        self.mean, self.std = _per_channel(mean, "mean", num_channels), _per_channel(std, "std", num_channels)
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"LlavaDataset std must be above 0 in every channel, got {self.std}")
        self._records = [_parse(self.path, i, r) for i, r in enumerate(_read_json(self.path))]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        sample: dict[str, Any] = {"messages": [{"role": role, "content": content}
                                               for role, content in record.messages]}
        if record.images:
            sample[self.image_key] = [self._image(record, k) for k in range(len(record.images))]
        return sample

    def _image(self, record: _Record, k: int) -> torch.Tensor:
        """Image ``k`` of ``record`` as a normalised ``[C, H, W]`` tensor."""
        where = f"{self.path}: {record.name}: image[{k}]"
        path = self.image_root / record.images[k]
        if not path.is_file():
            raise DataError(f"{where}: no such file {path} (image paths are relative to {self.image_root})")
        return read_image(path, where, patch_size=self.patch_size, max_size=self.max_size,
                          num_channels=self.num_channels, mean=self.mean, std=self.std)


def read_image(path, where: str, *, patch_size: int, max_size: int, num_channels: int = 3,
               mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The image file ``path`` (PNG, JPEG, ...) as a ``[C, H, W]`` tensor for a vision tower:
    resized by :func:`fit_size`, scaled to [0, 1], normalised by ``mean`` and ``std``; a DataError
    naming ``where`` when it cannot be read."""
    Image = _pil()
    mean, std = _per_channel(mean, "mean", num_channels), _per_channel(std, "std", num_channels)
    try:
        with Image.open(path) as opened:
            image = opened.convert(_MODES[num_channels])
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot read {path} as an image ({type(err).__name__}: {err})") from None
    size = fit_size(*image.size, patch_size, max_size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).reshape(size[1], size[0], num_channels) / 255.0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _per_channel(values, name: str, num_channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if num_channels == 1 and values:
        return values[:1]
    if len(values) != num_channels:
        raise ConfigError(f"LlavaDataset {name} has {len(values)} values for {num_channels} channels")
    return values


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise DependencyError(f"reading LLaVA images needs Pillow ({e}): pip install pillow") from e
    return Image


def _read_json(path: Path) -> list:
    """The file's records: a JSON list, or (``.jsonl``) one JSON value per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if path.suffix == ".jsonl":
        return [_decode(path, line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = _decode(path, text, None)
    if not isinstance(records, list):
        raise DataError(f"{path}: holds a JSON {type(records).__name__}, not a list of records (or give a "
                        f".jsonl file with one record a line)")
    return records


def _decode(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {line} column {err.colno}" if line else f"line {err.lineno} column {err.colno}"
        raise DataError(f"{path}: {at}: not valid JSON ({err.msg})") from None


def _parse(path: Path, index: int, record: Any) -> _Record:
    """One record checked, its images listed and its turns as (role, content) pairs, tags added."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index} is a {type(record).__name__}, not an object with 'conversations'")
    name = f"record {index}" + (f" (id {excerpt(record['id'])})" if "id" in record else "")

    def fail(problem: str):
        raise DataError(f"{path}: {name}: {problem}")

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        fail(f"'conversations' must be a non-empty list of turns, got {excerpt(turns)}")
    images = _images(record.get("image"), fail)
    messages = [_turn(turn, k, fail) for k, turn in enumerate(turns)]
    tags = sum(content.count(IMAGE_TAG) for _, content in messages)
    if images and not tags:
        first = next((k for k, (role, _) in enumerate(messages) if role == "user"), None)
        if first is None:
            fail(f"{len(images)} image(s) but no <image> tag and no human turn to put one in")
        messages[first] = ("user", f"{IMAGE_TAG}\n" * len(images) + messages[first][1])
    elif tags != len(images):
        fail(f"the turns hold {tags} <image> tag(s) for {len(images)} image(s) in 'image'; give one tag per image")
    return _Record(name, images, tuple(messages))


def _images(value: Any, fail) -> tuple[str, ...]:
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        fail(f"'image' must be a file name or a list of file names, got {excerpt(value)}")
    return tuple(names)


def _turn(turn: Any, k: int, fail) -> tuple[str, str]:
    if not isinstance(turn, dict):
        fail(f"conversations[{k}] is a {type(turn).__name__}, not an object with 'from' and 'value'")
    if turn.get("from") not in ROLES:
        fail(f"conversations[{k}].from is {excerpt(turn.get('from'))}, not one of {', '.join(map(repr, ROLES))}")
    if not isinstance(turn.get("value"), str):
        fail(f"conversations[{k}].value must be text, got {excerpt(turn.get('value'))}")
    return ROLES[turn["from"]], turn["value"]
