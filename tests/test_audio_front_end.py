"""The audio front end: WAV files and waveforms -> the log-mel each audio encoder kind takes.

Both kinds' features equal transformers' feature extractors' for the same waveform (a chirp
plus noise, 1.3 s). Tolerance: each computes the same float32 operations in the same order
(``torch.stft``, the same float32 filter bank, one matmul, one log), so they agree bit for bit
here (measured max difference 0.0); the bound allows another BLAS or FFT ordering of the
float32 sums: ~1e-6 relative on a mel energy is ~1e-7 on Whisper's ``log10(x) / 4`` and, after
Parakeet's per-bin normalisation by a standard deviation of order 1, a few 1e-6 on its values
(|x| < 10); 1e-5 for Whisper's and 1e-4 for Parakeet's leave an order of magnitude to spare.
"""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from cli_in_process import ROOT, main_in_process

SR = 16_000
DIGITS = ROOT / "examples" / "digits_sum.yaml"


def _chirp(seconds: float = 1.3, rate: int = SR, seed: int = 0) -> np.ndarray:
    """A chirp from 200 Hz to 3 kHz plus white noise, float32 in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    sweep = 0.5 * np.sin(2 * np.pi * (200 * t + (3000 - 200) / (2 * seconds) * t ** 2))
    return (sweep + 0.05 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def _write_wav(path, pcm: np.ndarray, rate: int = SR, width: int = 2) -> None:
    """``pcm`` (int samples, [frames] or [frames, channels]) as a PCM WAV file of ``width`` bytes."""
    frames = pcm.reshape(len(pcm), -1)
    if width == 1:
        data = (frames + 128).astype(np.uint8).tobytes()
    elif width == 3:
        data = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = frames.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(frames.shape[1])
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(data)


def _audio(**config):
    from submodels.audio import AudioBuilder, AudioConfig

    return AudioBuilder(AudioConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **config))


def _conformer(**config):
    from submodels.conformer import ConformerBuilder, ConformerConfig

    return ConformerBuilder(ConformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **config))


# --- the features, against transformers ----------------------------------------------------------

@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_equals_transformers(n_mels):
    from transformers import WhisperFeatureExtractor

    wave_ = _chirp()
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    ours = _audio(n_mels=n_mels).features_from_waveform(torch.from_numpy(wave_), SR)
    theirs = extractor(wave_, sampling_rate=SR, padding="longest", return_tensors="pt")["input_features"][0]
    assert ours.shape == (len(wave_) // 160, n_mels) == theirs.T.shape
    assert (ours - theirs.T).abs().max() <= 1e-5

    # Whisper's own layout: the clip padded with silence to max_frames, as the extractor pads to 30 s
    padded = _audio(n_mels=n_mels, max_frames=200, features_layout="mels_frames")
    ours = padded.features_from_waveform(torch.from_numpy(wave_), SR)
    theirs = extractor(wave_, sampling_rate=SR, max_length=200 * 160, return_tensors="pt")["input_features"][0]
    assert ours.shape == (n_mels, 200) == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("n_mels", [80, 128])
def test_parakeet_log_mel_equals_transformers_on_the_frames_its_mask_keeps(n_mels):
    from transformers import ParakeetFeatureExtractor

    wave_ = _chirp()
    ours = _conformer(n_mels=n_mels).features_from_waveform(torch.from_numpy(wave_), SR)
    out = ParakeetFeatureExtractor(feature_size=n_mels)(wave_, sampling_rate=SR, return_tensors="pt")
    theirs, kept = out["input_features"][0], out["attention_mask"][0]
    assert ours.shape == (len(wave_) // 160, n_mels) == theirs[kept].shape
    assert (ours - theirs[kept]).abs().max() <= 1e-4
    assert not theirs[~kept].any()  # the one frame beyond them is zeros: no clip information


def test_other_rates_are_resampled_with_a_windowed_sinc():
    from submodels.log_mel import resample

    for rate in (8000, 22050, 44100, 48000):
        t = np.arange(rate // 2) / rate
        out = resample(torch.from_numpy(np.sin(2 * np.pi * 1000 * t)), rate)
        assert len(out) == SR // 2
        exact = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / SR)
        assert np.abs(out.numpy() - exact)[64:-64].max() < 1e-3, rate  # measured 1.7e-4 to 4.4e-4
    assert _audio().features_from_waveform(torch.zeros(44100), 44100).shape == (100, 80)  # 1 s: 100 frames
    with pytest.raises(ValueError, match="16001 Hz to 16000 Hz .* convert the audio"):
        resample(torch.zeros(100), 16001)


def test_clips_a_kind_cannot_take_are_named():
    with pytest.raises(ValueError, match="at least 201"):
        _audio().features_from_waveform(torch.zeros(200), SR)
    with pytest.raises(ValueError, match="max_frames"):
        _audio(max_frames=50).features_from_waveform(torch.zeros(SR), SR)
    with pytest.raises(ValueError, match="longer than the 50 frames"):
        _audio(max_frames=50, features_layout="mels_frames").features_from_waveform(torch.zeros(SR), SR)
    with pytest.raises(ValueError, match="max_frames"):
        _conformer(max_frames=50).features_from_waveform(torch.zeros(SR), SR)
    from mimo_builder._internal.errors import ConfigError
    from submodels.projector import ProjectorBuilder, ProjectorConfig

    with pytest.raises(ConfigError, match="node kind 'projector' .* has no audio front end"):
        ProjectorBuilder(ProjectorConfig(input_size=8, output_size=8)).features_from_waveform(torch.zeros(SR), SR)


# --- WAV files -----------------------------------------------------------------------------------

def test_a_stereo_16_bit_wav_reads_back_as_its_mono_average(tmp_path):
    from mimo_builder._internal.data.wav import read_wav

    stereo = np.stack([_chirp(), _chirp(seed=1)], axis=1).clip(-1, 1 - 2 ** -15)
    _write_wav(tmp_path / "clip.wav", np.round(stereo * 32768).astype(np.int16))  # within 1/65536 of each sample
    waveform, rate = read_wav(tmp_path / "clip.wav")
    assert rate == SR and waveform.dtype == torch.float32 and waveform.shape == (len(stereo),)
    assert np.abs(waveform.numpy() - stereo.mean(axis=1)).max() <= 1 / 32768


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_of_each_width_reads_exactly(tmp_path, width):
    from mimo_builder._internal.data.wav import read_wav

    full = 2 ** (8 * width - 1)
    pcm = np.array([-full, -full // 2, -1, 0, 1, full // 3, full - 1], dtype=np.int64)
    _write_wav(tmp_path / "w.wav", pcm, rate=8000, width=width)
    waveform, rate = read_wav(tmp_path / "w.wav")
    assert rate == 8000 and waveform.tolist() == (pcm / full).astype(np.float32).tolist()


def _fmt_wav(path, tag: int) -> None:
    """A WAV file whose fmt chunk names format ``tag`` (7: mu-law, 3: IEEE float), one silent second."""
    import struct

    fmt = struct.pack("<HHIIHH", tag, 1, 8000, 8000, 1, 8)
    data = bytes(8000)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_files_that_are_not_pcm_wav_are_refused_with_the_reason(tmp_path):
    from mimo_builder._internal.data.wav import read_wav

    _write_wav(tmp_path / "whole.wav", np.zeros(1600, dtype=np.int16))
    whole = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[:1000])
    (tmp_path / "header.wav").write_bytes(whole[:30])
    (tmp_path / "text.wav").write_text("not audio")
    _fmt_wav(tmp_path / "mulaw.wav", 7)
    _fmt_wav(tmp_path / "float.wav", 3)
    for name, reason in (("cut", "header declares 1600 frames, the file holds 478: it is truncated"),
                         ("header", "cannot read it as a WAV file"),
                         ("text", "not a PCM WAV file (file does not start with RIFF id)"),
                         ("mulaw", "a compressed WAV file (unknown format: 7)"),
                         ("float", "a 32-bit float WAV file")):
        with pytest.raises(ValueError) as err:
            read_wav(tmp_path / f"{name}.wav")
        assert reason in str(err.value), (name, err.value)


# --- generate --audio x.wav, and a sample's .wav path --------------------------------------------

def _digits_graph():
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.validation import validate_graph

    return validate_graph(Graph.from_yaml(DIGITS.read_text()).colocated(1), 1)


def _tone(tmp_path) -> tuple:
    """A 700-sample stereo tone at 16 kHz (4 frames: the digits graph's max_frames) as a WAV file,
    and the mono waveform the file holds."""
    t = np.arange(700) / SR
    pcm = np.round(np.stack([np.sin(2 * np.pi * 875 * t), np.sin(2 * np.pi * 1125 * t)], 1) * 12000).astype(np.int16)
    _write_wav(tmp_path / "tone.wav", pcm)
    return tmp_path / "tone.wav", (pcm.astype(np.float64).mean(1) / 32768).astype(np.float32)


def test_a_prompt_and_a_sample_may_name_a_wav_file(tmp_path):
    from transformers import WhisperFeatureExtractor

    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.prompt import PromptRequest
    from mimo_builder._internal.data.tokenizer import ByteTokenizer

    valid, (path, mono) = _digits_graph(), _tone(tmp_path)
    theirs = WhisperFeatureExtractor(feature_size=16)(mono, sampling_rate=SR, padding="longest",
                                                      return_tensors="pt")["input_features"][0].T
    np.save(tmp_path / "tone.npy", theirs.numpy())
    sample = PromptRequest("+<audio>=", audio=(str(path),)).sample(valid, ByteTokenizer())
    (clip,) = sample["audio_features"]
    assert clip.shape == (4, 16) and (clip - theirs).abs().max() <= 1e-5
    from_npy = PromptRequest("+<audio>=", audio=(str(tmp_path / "tone.npy"),)).sample(valid, ByteTokenizer())
    assert torch.equal(from_npy["audio_features"][0], theirs)

    collate = GraphCollator(valid, ByteTokenizer())
    image = torch.zeros(1, 8, 8)
    rows = [{"pixel_values": image, "audio_features": item, "prompt": "<image>+<audio>=", "answer": "1+2=3"}
            for item in (str(path), clip)]
    by_path, by_array = collate(rows[:1]), collate(rows[1:])
    assert all(torch.equal(by_path[key], by_array[key]) for key in by_array)

    from mimo_builder._internal.errors import DataError

    (tmp_path / "cut.wav").write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"sample 0\['audio_features'\]: .*cut.wav: its header declares"):
        collate([{**rows[0], "audio_features": str(tmp_path / "cut.wav")}])


def test_a_kind_without_an_audio_front_end_is_named(tmp_path):
    from mimo_builder._internal.data.prompt import PromptRequest
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder.kinds import ModelBuilder
    from submodels.audio import AudioBuilder

    class NoFrontEnd(AudioBuilder):
        """The audio kind as a plug-in that defines no front end."""

        features_from_waveform = ModelBuilder.features_from_waveform

    valid, (path, _) = _digits_graph(), _tone(tmp_path)
    valid.builders["audio"] = NoFrontEnd(valid.configs["audio"])
    with pytest.raises(ConfigError, match=f"generate --audio {path}: node kind 'audio' .* has no audio front end"):
        PromptRequest("+<audio>=", audio=(str(path),)).sample(valid, ByteTokenizer())


def test_bad_audio_files_are_named_before_any_rank(tmp_path):
    (tmp_path / "clip.mp3").write_bytes(b"ID3")
    path, _ = _tone(tmp_path)
    (tmp_path / "cut.wav").write_bytes(path.read_bytes()[:500])
    long = tmp_path / "long.wav"
    _write_wav(long, np.zeros(SR, dtype=np.int16))
    for name, message in (("clip.mp3", "give a .wav file (PCM) or the clip's log-mel features"),
                          ("cut.wav", "its header declares 700 frames, the file holds 114: it is truncated"),
                          ("long.wav", "a clip of 100 frames x 16 mels: the encoder takes 1 to 4 frames")):
        result = main_in_process("generate", str(DIGITS), "--colocate", "--nproc", "1", "--load", str(tmp_path),
                                 "--prompt", "+<audio>=", "--audio", str(tmp_path / name))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result
        assert f"error: generate --audio {tmp_path / name}: {message}" in result.stderr, result.stderr
