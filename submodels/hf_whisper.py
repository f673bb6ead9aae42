"""Hugging Face Whisper encoder (``WhisperEncoder``, or the encoder of ``WhisperModel`` /
``WhisperForConditionalGeneration``) <-> the audio node.

q/k/v are fused per head into ``linear_qkv``; Whisper's key projection has no bias, so the
node's key bias starts at zero (export refuses one that training moved). With sinusoidal
positions the node computes Whisper's fixed table itself: the saved table is skipped on import
and written on export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, fused_qkv, rename

LAYER = {"self_attn_layer_norm": "input_layernorm", "self_attn.out_proj": "self_attention.linear_proj",
         "final_layer_norm": "pre_mlp_layernorm", "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}


def whisper_encoder_mapping(cfg) -> HFMapping:
    """The mapping of an :class:`~submodels.audio.AudioConfig` to a Whisper encoder."""
    if cfg.num_query_groups not in (None, cfg.num_attention_heads):
        raise HFWeightsError("Whisper attention has one key/value head per query head; leave num_query_groups unset")
    heads = cfg.num_attention_heads
    rules = [rename(f"conv{i}.{kind}", f"conv{i}.{kind}") for i in (1, 2) for kind in ("weight", "bias")]
    learned = cfg.position_embedding_type == "learned"
    if learned:
        rules.append(rename("position_embeddings.weight", "embed_positions.weight"))
    for i in range(cfg.num_layers):
        hf, node = f"layers.{i}.", f"decoder.layers.{i}."
        rules += [rename(f"{node}{ours}.{kind}", f"{hf}{theirs}.{kind}")
                  for theirs, ours in LAYER.items() for kind in ("weight", "bias")]
        q, k, v = (f"{hf}self_attn.{p}_proj" for p in "qkv")
        rules.append(fused_qkv(f"{node}self_attention.linear_qkv.weight", q + ".weight", k + ".weight",
                               v + ".weight", heads, heads))
        rules.append(fused_qkv(f"{node}self_attention.linear_qkv.bias", q + ".bias", None, v + ".bias", heads, heads))
    rules += [rename(f"decoder.final_layernorm.{kind}", f"layer_norm.{kind}") for kind in ("weight", "bias")]
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config={"model_type": "whisper", "architectures": ["WhisperEncoder"]},
        skipped=() if learned else ("embed_positions.",),
        prefixes=("", "model.encoder.", "encoder."),
        constants=None if learned else lambda: {"embed_positions.weight": sinusoids(cfg.max_tokens, cfg.hidden_size)},
    )


def _expected_fields(cfg) -> dict[str, Expect]:
    return {
        "model_type": Expect("whisper", "builder 'audio'"),
        "d_model": Expect(cfg.hidden_size, "hidden_size", 256),
        "encoder_layers": Expect(cfg.num_layers, "num_layers", 4),
        "encoder_attention_heads": Expect(cfg.num_attention_heads, "num_attention_heads", 4),
        "encoder_ffn_dim": Expect(cfg.ffn_hidden_size or 4 * cfg.hidden_size, "ffn_hidden_size", 1536),
        "num_mel_bins": Expect(cfg.n_mels, "n_mels", 80),
        "max_source_positions": Expect(cfg.max_tokens, "max_frames / 2", 1500),
        "activation_function": Expect("gelu", "the node's GELU", "gelu"),
    }


def sinusoids(length: int, channels: int, device=None) -> torch.Tensor:
    """Whisper's fixed position table [length, channels]: sin then cos, timescales 1 to 10000."""
    half = channels // 2
    rate = math.log(10000) / max(half - 1, 1)
    inv_timescales = torch.exp(-rate * torch.arange(half, device=device, dtype=torch.float32))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, channels - 2 * half))
