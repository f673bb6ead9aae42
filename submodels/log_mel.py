"""Audio front ends in plain torch and numpy: a mono waveform -> the log-mel features an audio
encoder takes, computed as Hugging Face transformers' feature extractors compute them (which
this module does not import: transformers is a test dependency only).

- :func:`whisper_log_mel`: ``WhisperFeatureExtractor``'s. 16 kHz, a periodic Hann window of 400
  samples, FFT 400, hop 160 (10 ms frames), ``torch.stft`` centred with reflected edges, power
  spectrum without its last frame, Slaney mel filters (Slaney scale and area norm, 0 to 8 kHz),
  ``log10`` floored at 1e-10, then clamped at the clip's maximum - 8 and mapped by ``(x + 4) / 4``.
  ``L`` samples give ``L // 160`` frames; Whisper's own layout first pads the clip with silence
  to its 30 s (``pad_to`` frames), as the extractor does by default.
- :func:`parakeet_log_mel`: ``ParakeetFeatureExtractor``'s (NeMo's preprocessor). 16 kHz,
  pre-emphasis ``x[t] - 0.97 x[t-1]``, a symmetric Hann window of 400 samples centred in an FFT
  of 512, hop 160, ``torch.stft`` centred with zero padding, power spectrum, Slaney mel filters
  (0 to 8 kHz, the filters rounded to float32 before their norm), natural log after adding 2^-24,
  then each mel bin normalised over the clip's frames (mean, and the standard deviation with
  n - 1, plus 1e-5). ``L`` samples give ``L // 160`` frames: the frames the extractor's
  attention mask keeps (its one extra frame at the end is masked to zeros).
- :func:`resample`: another sample rate to 16 kHz (or any rate) with a windowed-sinc polyphase
  filter, the one torchaudio's ``resample`` uses by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SAMPLE_RATE = 16_000
"""The rate both front ends take (Hz); :func:`resample` brings other rates to it."""
HOP = 160
"""Samples between frames: 10 ms at 16 kHz."""
WHISPER_FFT = 400
"""Whisper's FFT size and window length (25 ms)."""
PARAKEET_FFT, PARAKEET_WINDOW, PARAKEET_PREEMPHASIS = 512, 400, 0.97
"""Parakeet's FFT size, window length (centred in the FFT) and pre-emphasis coefficient."""
MAX_KERNEL_ELEMENTS = 1 << 24
"""The most coefficients :func:`resample`'s filter bank may hold (64 MiB of float32): rates whose
ratio does not reduce (e.g. 16001 Hz to 16000 Hz) would need one filter per output phase."""


def resample(waveform: torch.Tensor, rate: int, new_rate: int = SAMPLE_RATE, *, zero_crossings: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """``waveform`` [samples] at ``rate`` Hz, resampled to ``new_rate`` Hz (float32, ``ceil(samples *
    new_rate / rate)`` samples; unchanged when the rates agree).

    A polyphase windowed-sinc filter, torchaudio's default (``sinc_interp_hann``): the rates are
    reduced by their gcd to ``rate' -> new_rate'``; each of the ``new_rate'`` output phases is a
    low-pass sinc with its cut-off at ``rolloff`` times the lower Nyquist frequency, ``zero_crossings``
    zero crossings on each side, tapered by a Hann window, applied as one strided convolution. A
    ValueError for rates below 1 or a ratio whose filter bank would exceed :data:`MAX_KERNEL_ELEMENTS`.
    """
    if rate < 1 or new_rate < 1:
        raise ValueError(f"sample rates must be positive, got {rate} Hz -> {new_rate} Hz")
    waveform = waveform.to(torch.float32)
    if rate == new_rate:
        return waveform
    gcd = math.gcd(rate, new_rate)
    old, new = rate // gcd, new_rate // gcd
    width = math.ceil(zero_crossings * old / (min(old, new) * rolloff))
    if new * (2 * width + old) > MAX_KERNEL_ELEMENTS:
        raise ValueError(f"resampling {rate} Hz to {new_rate} Hz ({old}:{new} after their common divisor) needs a "
                         f"filter bank of {new * (2 * width + old):,} coefficients; convert the audio to {new_rate} Hz "
                         f"first (e.g. ffmpeg -i in.wav -ar {new_rate} out.wav)")
    kernel = _sinc_kernel(old, new, width, zero_crossings, rolloff)
    length = waveform.shape[-1]
    padded = torch.nn.functional.pad(waveform.reshape(1, 1, length), (width, width + old))
    phases = torch.nn.functional.conv1d(padded, kernel, stride=old)  # [1, new, steps]
    return phases.transpose(1, 2).reshape(-1)[:math.ceil(new * length / old)]


def _sinc_kernel(old: int, new: int, width: int, zero_crossings: int, rolloff: float) -> torch.Tensor:
    """The filter bank [new, 1, 2 * width + old] of :func:`resample`, ``width`` input samples each side."""
    base = min(old, new) * rolloff
    offsets = torch.arange(-width, width + old, dtype=torch.float64)[None, None] / old
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + offsets) * base
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * base / old).to(torch.float32)


def mel_filter_bank(n_freqs: int, n_mels: int, sample_rate: int = SAMPLE_RATE, max_frequency: float | None = None,
                    *, round_before_norm: bool = False) -> torch.Tensor:
    """Slaney-style triangular mel filters [n_freqs, n_mels] (float32): transformers'
    ``mel_filter_bank(..., norm="slaney", mel_scale="slaney")`` from 0 Hz to ``max_frequency``
    (default: ``sample_rate / 2``). Computed in float64; ``round_before_norm`` rounds the
    triangles to float32 before the area norm, as that function does for ``dtype=np.float32``."""
    top = _hertz_to_mel(sample_rate / 2 if max_frequency is None else max_frequency)
    centres = _mel_to_hertz(np.linspace(0.0, top, n_mels + 2))
    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    slopes = centres[None, :] - fft_freqs[:, None]
    gaps = np.diff(centres)
    down, up = -slopes[:, :-2] / gaps[:-1], slopes[:, 2:] / gaps[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    if round_before_norm:
        filters = filters.astype(np.float32)
    filters *= (2.0 / (centres[2:] - centres[:-2]))[None, :]
    return torch.from_numpy(filters.astype(np.float32))


def _hertz_to_mel(freq):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    logarithmic = 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(freq >= 1000.0, logarithmic, mels)


def _mel_to_hertz(mels):
    mels = np.asarray(mels, dtype=np.float64)
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), 200.0 * mels / 3.0)


def frames_of(samples: int) -> int:
    """Frames both front ends make of ``samples`` samples at 16 kHz: ``samples // 160``."""
    return samples // HOP


def whisper_log_mel(waveform: torch.Tensor, n_mels: int, pad_to: int | None = None) -> torch.Tensor:
    """Whisper's log-mel [n_mels, frames] of a 16 kHz mono ``waveform`` (see the module notes):
    ``frames = samples // 160``, or ``pad_to`` frames of the clip padded with silence (a ValueError
    for a longer clip). A ValueError for fewer than 201 samples (the reflected edge needs them)."""
    samples = waveform.shape[-1]
    if pad_to is not None:
        if frames_of(samples) > pad_to:
            raise ValueError(f"a clip of {samples / SAMPLE_RATE:.2f} s ({frames_of(samples)} frames of 10 ms) "
                             f"is longer than the {pad_to} frames ({pad_to * HOP / SAMPLE_RATE:g} s) the "
                             "encoder pads to (max_frames)")
        waveform = torch.nn.functional.pad(waveform, (0, pad_to * HOP - samples))
    elif samples <= WHISPER_FFT // 2:
        raise ValueError(f"a clip of {samples} samples at {SAMPLE_RATE} Hz is too short: Whisper's front end "
                         f"needs at least {WHISPER_FFT // 2 + 1}")
    window = torch.hann_window(WHISPER_FFT)
    stft = torch.stft(waveform.to(torch.float32), WHISPER_FFT, HOP, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = mel_filter_bank(WHISPER_FFT // 2 + 1, n_mels).T @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


def parakeet_log_mel(waveform: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Parakeet's normalised log-mel [frames, n_mels] of a 16 kHz mono ``waveform`` (see the module
    notes), ``frames = samples // 160``; a ValueError below 2 frames (the normalisation's
    standard deviation needs two)."""
    samples = waveform.shape[-1]
    frames = frames_of(samples)
    if frames < 2:
        raise ValueError(f"a clip of {samples} samples at {SAMPLE_RATE} Hz is too short: Parakeet's front end "
                         f"needs at least {2 * HOP} (two frames)")
    x = waveform.to(torch.float32)
    x = torch.cat([x[:1], x[1:] - PARAKEET_PREEMPHASIS * x[:-1]])
    window = torch.hann_window(PARAKEET_WINDOW, periodic=False)
    stft = torch.stft(x, PARAKEET_FFT, hop_length=HOP, win_length=PARAKEET_WINDOW, window=window,
                      return_complex=True, pad_mode="constant")
    power = torch.view_as_real(stft).pow(2).sum(-1).sqrt().pow(2)
    filters = mel_filter_bank(PARAKEET_FFT // 2 + 1, n_mels, round_before_norm=True)
    log = torch.log(filters.T @ power + 2.0 ** -24).T[:frames]  # [frames, n_mels]
    mean = log.mean(0)
    std = ((log - mean) ** 2).sum(0).div(frames - 1).sqrt()
    return (log - mean) / (std + 1e-5)
