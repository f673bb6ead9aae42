"""The multi-image demo task: 1 to 4 digit images of different sizes in a two-turn conversation.

Each sample shows n = 1 to 4 of scikit-learn's handwritten digits (8x8, nothing downloaded), each
upscaled (bilinear) to its own size: 16 x 16, 8 x 32 (tall) or 32 x 8 px (wide). The vision tower
cuts each into four 8 px patches (its learned 2 x 2 grid of positions, interpolated for the 4 x 1
and 1 x 4 grids), and the projector merges an image's four tokens into one, so the backbone reads
one token per image. The conversation, rendered by the tokenizer's ChatML template::

    user:      <image><image><image>How many digits?
    assistant: 3
    user:      What is their sum?
    assistant: 4+0+7=11

The final answer is worked: the digits in the order shown, then their sum. It counts (``lm.
free_running``) when the model, given the images, the first question, its true answer and the
second question, writes all of it and its end of turn right; chance is about 1 in 10^n.

The tokenizer is a byte-level BPE trained at start (in each process, in a temporary folder that is
removed; well under a second) on the conversation's words and every number up to 36, so each sum
is one token. ``./scripts/demo --multi`` runs::

    mimo-builder --allow examples run examples/digits_chat.yaml --nproc 2 --steps 1000 --batch-size 64 \\
        --log-interval 100 --data examples.digits_chat:train_data --eval-data examples.digits_chat:held_out_data

The last 297 images are held out (never trained on).
"""

from __future__ import annotations

import functools
import tempfile

import torch
import torch.nn.functional as F

from mimo_builder import GraphData, HFTokenizer

HELD_OUT = 297
SIZES = ((16, 16), (8, 32), (32, 8))
"""Height and width of an image: four 8 px patches each (the vision node's patch_size)."""
MAX_DIGITS = 4
QUESTIONS = ("How many digits?", "What is their sum?")
TRAIN_SAMPLES, HELD_OUT_SAMPLES = 20_000, 256


def images_at(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, 8, 8] digits (values 0..16) as [n, 1, height, width] in [-1, 1], upscaled bilinear."""
    scaled = (images / 8.0 - 1.0).unsqueeze(1)
    return F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)


def worked_sum(digits: list[int]) -> str:
    """The final answer: ``4+0+7=11``."""
    return "+".join(map(str, digits)) + f"={sum(digits)}"


class DigitChats:
    """Map-style dataset: per sample 1 to MAX_DIGITS images drawn from ``images`` (each at one of
    SIZES) and the two-turn conversation about them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, samples: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.sized = [images_at(images, size) for size in SIZES]
        self.labels = labels
        self.counts = torch.randint(1, MAX_DIGITS + 1, (samples,), generator=generator)
        self.picks = torch.randint(0, len(labels), (samples, MAX_DIGITS), generator=generator)
        self.sizes = torch.randint(0, len(SIZES), (samples, MAX_DIGITS), generator=generator)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int) -> dict:
        n = int(self.counts[i])
        picks, sizes = self.picks[i, :n].tolist(), self.sizes[i, :n].tolist()
        digits = [int(self.labels[k]) for k in picks]
        return {"pixel_values": [self.sized[s][k] for k, s in zip(picks, sizes)],
                "messages": [{"role": "user", "content": "<image>" * n + QUESTIONS[0]},
                             {"role": "assistant", "content": str(n)},
                             {"role": "user", "content": QUESTIONS[1]},
                             {"role": "assistant", "content": worked_sum(digits)}]}


def tokenizer_texts() -> list[str]:
    """What the BPE learns from: the roles, the questions, and each count, digit and sum."""
    words = ["user", "assistant", *QUESTIONS, "+", "=", *map(str, range(9 * MAX_DIGITS + 1))]
    return words * 4


@functools.lru_cache(maxsize=1)
def chat_tokenizer() -> HFTokenizer:
    """The BPE with its ChatML template, trained here (the same every time): ``<image>`` is id 4."""
    from transformers import AutoTokenizer

    from mimo_builder import train_chat_tokenizer

    with tempfile.TemporaryDirectory(prefix="digits_chat_tokenizer_") as folder:
        train_chat_tokenizer(tokenizer_texts(), folder, tags=("<image>",))
        return HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target)


def train_data() -> GraphData:
    """Conversations about every image but the held-out ones."""
    images, labels = _digits()
    return GraphData(DigitChats(images[:-HELD_OUT], labels[:-HELD_OUT], TRAIN_SAMPLES, seed=1), chat_tokenizer())


def held_out_data() -> GraphData:
    """Conversations about the last 297 images only."""
    images, labels = _digits()
    return GraphData(DigitChats(images[-HELD_OUT:], labels[-HELD_OUT:], HELD_OUT_SAMPLES, seed=2), chat_tokenizer())
