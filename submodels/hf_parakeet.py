"""Hugging Face Parakeet encoder (``ParakeetEncoder``, model_type ``parakeet_encoder``; or the
encoder of ``ParakeetForCTC`` / RNN-T / TDT under ``encoder.``, or a Nemotron-H Omni model's
``audio_tower.``, which its released folders name ``sound_encoder.encoder.``) <-> the conformer node.

The node names its plain-torch modules (subsampling, LayerNorms, convolution module with its
BatchNorm statistics) as transformers does; its Megatron-Core linears are renamed
(``feed_forward1.linear1`` <-> ``feed_forward1.linear_fc1``, ``self_attn.o_proj`` <->
``self_attn.linear_proj``, ``self_attn.relative_k_proj`` <-> ``self_attn.linear_pos``), and q/k/v
are fused per head into ``linear_qkv``. Relative positions are computed, never stored.
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, fused_qkv, rename

MODEL_TYPE = "parakeet_encoder"
PREFIXES = ("", "encoder.", "audio_tower.", "sound_encoder.encoder.")
"""ParakeetEncoder saved alone; inside ParakeetForCTC (RNN-T, TDT); inside a Nemotron-H Omni model
(transformers' name, and the released checkpoints' that transformers renames on load)."""

SECTIONS = ("encoder_config", "audio_config")
"""config.json entries that describe the encoder inside a larger model (CTC/RNN-T/TDT; Omni)."""

TORCH_EPS = 1e-5
"""Parakeet's LayerNorms and BatchNorms use torch's default eps."""

LINEARS = {"feed_forward1.linear1": "feed_forward1.linear_fc1", "feed_forward1.linear2": "feed_forward1.linear_fc2",
           "feed_forward2.linear1": "feed_forward2.linear_fc1", "feed_forward2.linear2": "feed_forward2.linear_fc2",
           "self_attn.o_proj": "self_attn.linear_proj"}
NORMS = ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out")
CONVS = ("conv.pointwise_conv1", "conv.depthwise_conv", "conv.pointwise_conv2")
BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def parakeet_encoder_mapping(cfg, section: str | None = None) -> HFMapping:
    """The mapping of a :class:`~submodels.conformer_config.ConformerConfig` to a Parakeet
    encoder; ``section``: the config.json entry describing it inside a larger model (None: the top)."""
    eps = cfg.transformer.get("layernorm_epsilon", TORCH_EPS)
    if eps != TORCH_EPS:
        raise HFWeightsError(f"transformer.layernorm_epsilon {eps}: Parakeet's LayerNorms use {TORCH_EPS}; "
                             "leave it unset")
    omni = section == "audio_config"
    expect = _expected_fields(cfg, omni)
    if omni:  # released Omni checkpoints name the sub-model 'parakeet'
        del expect["model_type"]
    return HFMapping(
        rules=tuple(_subsampling_rules(cfg) + [r for i in range(cfg.num_layers) for r in _layer_rules(cfg, i)]),
        expect=expect,
        export_config={"model_type": MODEL_TYPE, "architectures": ["ParakeetEncoder"]},
        skipped=("feature_extractor.",),  # an Omni folder's mel front end, which the processor runs
        prefixes=PREFIXES,
        config_section=section,
        extra_checks=lambda hf: _head_problems(cfg, hf) + (_omni_type_problems(hf) if omni else []),
    )


def section_of(hf_config: dict) -> str | None:
    """The config.json entry that describes the encoder: one of :data:`SECTIONS`, or None (the top)."""
    return next((name for name in SECTIONS if isinstance(hf_config.get(name), dict)), None)


def _subsampling_rules(cfg) -> list:
    convs = [0] + [i for n in range(cfg.subsampling_layers - 1) for i in (2 + 3 * n, 3 + 3 * n)]
    names = [f"subsampling.layers.{i}.{kind}" for i in convs for kind in ("weight", "bias")]
    names += ["subsampling.linear.weight", "subsampling.linear.bias"]
    return [rename(name, name) for name in names]


def _layer_rules(cfg, i: int) -> list:
    """Layer ``i``'s rules: renamed linears, fused q/k/v, the rest under transformers' names."""
    at = f"layers.{i}."
    biases = ("weight", "bias") if cfg.attention_bias else ("weight",)
    rules = [rename(f"{at}{ours}.{kind}", f"{at}{theirs}.{kind}")
             for theirs, ours in LINEARS.items() for kind in biases]
    rules.append(rename(f"{at}self_attn.linear_pos.weight", f"{at}self_attn.relative_k_proj.weight"))
    heads = cfg.num_attention_heads
    q, k, v = (f"{at}self_attn.{p}_proj" for p in "qkv")
    rules += [fused_qkv(f"{at}self_attn.linear_qkv.{kind}", f"{q}.{kind}", f"{k}.{kind}", f"{v}.{kind}", heads, heads)
              for kind in biases]
    same = [f"{at}self_attn.bias_u", f"{at}self_attn.bias_v"]
    same += [f"{at}{norm}.{kind}" for norm in NORMS for kind in ("weight", "bias")]
    same += [f"{at}{conv}.{kind}" for conv in CONVS for kind in (("weight", "bias") if cfg.conv_bias else ("weight",))]
    same += [f"{at}conv.norm.{kind}" for kind in BATCH_NORM]
    return rules + [rename(name, name) for name in same]


def _expected_fields(cfg, omni: bool) -> dict[str, Expect]:
    """config.json fields with ParakeetEncoderConfig's defaults (an Omni model's audio_config
    defaults attention_bias and scale_input to false)."""
    return {
        "model_type": Expect(MODEL_TYPE, "builder 'conformer'"),
        "hidden_size": Expect(cfg.hidden_size, "hidden_size", 1024),
        "num_hidden_layers": Expect(cfg.num_layers, "num_layers", 24),
        "num_attention_heads": Expect(cfg.num_attention_heads, "num_attention_heads", 8),
        "intermediate_size": Expect(cfg.ffn_hidden_size or 4 * cfg.hidden_size, "ffn_hidden_size", 4096),
        "num_mel_bins": Expect(cfg.n_mels, "n_mels", 80),
        "subsampling_factor": Expect(cfg.subsampling_factor, "subsampling_factor", 8),
        "subsampling_conv_channels": Expect(cfg.subsampling_channels, "subsampling_channels", 256),
        "subsampling_conv_kernel_size": Expect(cfg.subsampling_kernel_size, "subsampling_kernel_size", 3),
        "subsampling_conv_stride": Expect(cfg.subsampling_stride, "subsampling_stride", 2),
        "conv_kernel_size": Expect(cfg.conv_kernel_size, "conv_kernel_size", 9),
        "attention_bias": Expect(cfg.attention_bias, "attention_bias", not omni),
        "convolution_bias": Expect(cfg.conv_bias, "conv_bias", True),
        "scale_input": Expect(cfg.scale_input, "scale_input", not omni),
        "hidden_act": Expect(cfg.activation, "activation", "silu"),
    }


def _head_problems(cfg, hf: dict) -> list[str]:
    """A config.json num_key_value_heads or head_dim the node's attention cannot hold."""
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    out = []
    if hf.get("num_key_value_heads", heads) != heads:
        out.append(f"config.json num_key_value_heads={hf['num_key_value_heads']}: the conformer has one key/value "
                   f"head per query head (num_attention_heads={heads})")
    if hf.get("head_dim", head_dim) != head_dim:
        out.append(f"config.json head_dim={hf['head_dim']} but the node has hidden_size / num_attention_heads="
                   f"{head_dim}")
    return out


def _omni_type_problems(hf: dict) -> list[str]:
    """An Omni model's audio_config model_type other than Parakeet's (either of its names)."""
    have = hf.get("model_type", MODEL_TYPE)
    if have in (MODEL_TYPE, "parakeet"):
        return []
    return [f"config.json audio_config.model_type={have!r} but the node has builder 'conformer' (reads {MODEL_TYPE!r})"]
