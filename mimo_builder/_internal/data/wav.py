"""WAV files -> mono waveforms, and a clip's features for an audio encoder node.

:func:`read_wav` reads uncompressed PCM WAV files with Python's ``wave`` module (plain Python,
no audio library): 8-bit (unsigned), 16-, 24- or 32-bit (signed) samples, any number of
channels, averaged to mono; values scaled to [-1, 1) by the sample width's full scale (8-bit:
``(x - 128) / 128``, 16-bit: ``x / 32768``, ...). Compressed WAV files (mu-law, ADPCM, ...) and
32-bit IEEE float WAV files are refused, as is a file holding fewer frames than its header
declares (a truncated file). The sample rate is returned as the file states it: resampling is
the encoder's business (``ModelBuilder.features_from_waveform``), since each kind knows its rate.

:func:`wav_features` is the one step from a file to what a node's ``features`` port takes: the
node's builder turns the waveform into its own log-mel (``generate --audio clip.wav``, and a
sample's audio item given as a ``.wav`` path, :mod:`~mimo_builder._internal.data.modalities`).
"""

from __future__ import annotations

import os
import wave

import numpy as np
import torch

WAV_SUFFIX = ".wav"
"""The suffix of the files read as audio (compared in lower case)."""
_FULL_SCALE = {1: 128.0, 2: 32768.0, 3: 8388608.0, 4: 2147483648.0}


def is_wav(path) -> bool:
    """Whether ``path`` (a str or path-like) names a ``.wav`` file by its suffix (any case)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(WAV_SUFFIX)


def read_wav(path) -> tuple[torch.Tensor, int]:
    """(mono waveform float32 [samples] in [-1, 1), sample rate in Hz) of the PCM WAV file ``path``;
    a ValueError saying what is wrong with it (the caller names the file and where it came from)."""
    try:
        with wave.open(os.fspath(path), "rb") as wav:
            channels, width, rate, frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            data = wav.readframes(frames)
    except wave.Error as err:
        raise ValueError(_why_not(str(err))) from None
    except (EOFError, OSError) as err:
        why = f"{type(err).__name__}: {err or 'the file ends early'}"
        raise ValueError(f"cannot read it as a WAV file ({why})") from None
    if width not in _FULL_SCALE or channels < 1 or rate < 1:
        raise ValueError(f"a WAV file of {width * 8}-bit samples, {channels} channel(s) at {rate} Hz: read are "
                         "8-, 16-, 24- or 32-bit PCM, one channel or more, at a positive rate")
    if len(data) != frames * channels * width:
        raise ValueError(f"its header declares {frames} frames, the file holds {len(data) // (channels * width)}: "
                         "it is truncated")
    samples = _decode(data, width).reshape(frames, channels).mean(axis=1, dtype=np.float64)
    return torch.from_numpy((samples / _FULL_SCALE[width]).astype(np.float32)), rate


def _decode(data: bytes, width: int) -> np.ndarray:
    """The little-endian PCM samples of ``data`` as integers (8-bit centred on 0)."""
    if width == 1:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) - 128
    if width == 3:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        return np.where(value >= 1 << 23, value - (1 << 24), value)
    return np.frombuffer(data, dtype=f"<i{width}")


def _why_not(reason: str) -> str:
    """The ``wave`` module's refusal, said for a user."""
    if reason.startswith("unknown format: 3") or "00000003-0000-0010" in reason:  # IEEE float, plain or extensible
        return ("a 32-bit float WAV file: read are PCM files only; convert it, e.g. "
                "ffmpeg -i in.wav -c:a pcm_s16le out.wav")
    if reason.startswith("unknown format"):
        return (f"a compressed WAV file ({reason}): read are PCM files only; convert it, e.g. "
                "ffmpeg -i in.wav -c:a pcm_s16le out.wav")
    return f"not a PCM WAV file ({reason})"


def wav_features(path, builder) -> torch.Tensor:
    """The item ``builder``'s ``features`` port takes for the WAV file ``path``: its waveform read
    by :func:`read_wav`, turned into features by ``builder.features_from_waveform``; a ValueError
    (a ConfigError for a kind without an audio front end) saying why not."""
    waveform, rate = read_wav(path)
    return builder.features_from_waveform(waveform, rate)
