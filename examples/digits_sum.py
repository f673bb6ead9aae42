"""The demo task: an image shows a digit a, a sound encodes a digit b; the model writes a + b.

Asked "<image>+<audio>=", the model answers "a+b=s": the digit it sees, the digit it hears,
then their sum. An answer counts only when all three are right.

Images are scikit-learn's bundled handwritten digits (8x8, 1,797 of them; nothing downloaded).
Sounds are generated: a tone whose pitch encodes the digit (375 + 250 b Hz, random phase,
loudness and noise), turned into a 16-band log spectrogram of 4 frames. Neither modality alone
gives the answer, so a model above chance on held-out samples uses both encoders.

    mimo-builder --allow examples run examples/digits_sum.yaml --nproc 4 --steps 400 --batch-size 64 \\
        --data examples.digits_sum:train_data --eval-data examples.digits_sum:held_out_data

(what ``./scripts/demo`` runs; about 90% of held-out answers right after 400 steps, chance is 1%).

The last 297 images are held out (never trained on), each paired with fresh sounds.
"""

from __future__ import annotations

import math

import torch

from mimo_builder import ByteTokenizer, GraphData

HELD_OUT = 297
SAMPLE_RATE, FRAMES, BANDS, HOP = 8000, 4, 16, 128


def digit_sound(digit: int, generator: torch.Generator) -> torch.Tensor:
    """A noisy tone for ``digit`` as a [FRAMES, BANDS] log spectrogram (the audio node's layout)."""
    n = (FRAMES - 1) * HOP + 2 * HOP
    t = torch.arange(n) / SAMPLE_RATE
    phase, loudness = torch.rand(2, generator=generator)
    pitch = 375 + 250 * digit  # the middle of band digit + 1
    wave = (0.5 + loudness) * torch.sin(2 * math.pi * pitch * t + 2 * math.pi * phase)
    wave = wave + 0.3 * torch.randn(n, generator=generator)
    power = torch.stft(wave, n_fft=2 * HOP, hop_length=HOP, window=torch.hann_window(2 * HOP),
                       return_complex=True).abs().square()[:, :FRAMES]  # [frequencies, frames]
    bands = power[1:1 + BANDS * 8].reshape(BANDS, 8, FRAMES).sum(1)  # 16 bands of 250 Hz up to 4 kHz
    return (bands + 1e-3).log().T.contiguous()


class DigitSums:
    """Map-style dataset of (image of a, sound of b) -> "a+b" samples for the collator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = (images / 8.0 - 1.0).unsqueeze(1)  # [n, 1, 8, 8] in [-1, 1]
        self.a = labels
        self.b = torch.randint(0, 10, (len(labels),), generator=generator)
        self.sounds = torch.stack([digit_sound(int(b), generator) for b in self.b])

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "audio_features": self.sounds[i],
                "prompt": "<image>+<audio>=", "answer": f"{int(self.a[i])}+{int(self.b[i])}={int(self.a[i] + self.b[i])}"}


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target)


def train_data() -> GraphData:
    """Every image but the held-out ones, in a fresh order each epoch."""
    images, labels = _digits()
    return GraphData(DigitSums(images[:-HELD_OUT], labels[:-HELD_OUT], seed=1), ByteTokenizer())


def held_out_data() -> GraphData:
    """The last 297 images, with sounds the training set never had."""
    images, labels = _digits()
    return GraphData(DigitSums(images[-HELD_OUT:], labels[-HELD_OUT:], seed=2), ByteTokenizer())
