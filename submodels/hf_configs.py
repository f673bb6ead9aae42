"""Node configs from Hugging Face config.json sections (``import-hf``), by ``model_type``.

Each function reads one model's config (a whole config.json, or a section of a larger one such as
LLaVA's ``vision_config``) and returns the node's ``builder`` + ``config`` fields. A field the
kind cannot honour is a :class:`~mimo_builder._internal.errors.ConfigError` naming it and what
is supported; everything the node's mapping checks again at validation (``Expect`` fields) is
simply copied.
"""

from __future__ import annotations

from typing import Callable

from mimo_builder._internal.errors import ConfigError

VISION_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
DEFAULT_SEQ_LENGTH = 4096
"""A language model's seq_length when its config names no maximum (Mamba2 has none)."""


def _choice(section: dict, field: str, allowed: dict, where: str, default=None):
    value = section.get(field, default)
    if value not in allowed:
        raise ConfigError(f"{where}.{field}={value!r} is not supported; supported: {sorted(allowed)}")
    return allowed[value]


def clip_vision(section: dict, where: str) -> dict:
    """A ``vision`` node of a CLIP vision tower."""
    return {"builder": "vision", **_vit(section, 1e-5), "layout": "clip", "class_token": True,
            "activation": _choice(section, "hidden_act", VISION_ACTIVATIONS, where, "quick_gelu")}


def siglip_vision(section: dict, where: str) -> dict:
    """A ``vision`` node of a SigLIP vision tower (without its attention-pooling head)."""
    return {"builder": "vision", **_vit(section, 1e-6), "layout": "siglip", "class_token": False,
            "activation": _choice(section, "hidden_act", VISION_ACTIVATIONS, where, "gelu_pytorch_tanh")}


def radio_vision(section: dict, where: str) -> dict:
    """A ``vision`` node of a RADIO tower (``layout: radio``; the summary tokens are not an output)."""
    for field, supported in (("use_swiglu_ffn", False), ("layerscale_value", 1.0), ("drop_path_rate", 0.0),
                             ("qkv_bias", True)):
        if section.get(field, supported) != supported:
            raise ConfigError(f"{where}.{field}={section[field]!r} is not supported; supported: {supported!r}")
    _choice(section, "hidden_act", {"gelu": "gelu"}, where, "gelu")
    hidden, cls = section.get("hidden_size", 1280), section.get("num_cls_tokens", 3)
    node = {"builder": "vision", "layout": "radio", "num_layers": section.get("num_hidden_layers", 32),
            "hidden_size": hidden, "num_attention_heads": section.get("num_attention_heads", 16),
            "ffn_hidden_size": round(hidden * section.get("mlp_ratio", 4.0)),
            "image_size": section.get("image_size", 224), "patch_size": section.get("patch_size", 16),
            "max_image_size": section.get("max_img_size", 2048), "activation": "gelu",
            "class_token": cls > 0, "class_tokens": max(cls, 1), "registers": section.get("num_registers", 7),
            "video_patch_frames": section.get("video_temporal_patch_size"),
            "transformer": {"layernorm_epsilon": section.get("layer_norm_eps", 1e-6)}}
    for ours, theirs in (("image_mean", "norm_mean"), ("image_std", "norm_std")):
        if isinstance(section.get(theirs), list):
            node[ours] = tuple(section[theirs])
    return node


def parakeet_audio(section: dict, where: str) -> dict:
    """A ``conformer`` node of a Parakeet / FastConformer encoder (Nemotron-Omni's sound encoder)."""
    _choice(section, "hidden_act", {"silu": "silu"}, where, "silu")
    heads = section.get("num_attention_heads", 8)
    if section.get("num_key_value_heads", heads) != heads:
        raise ConfigError(f"{where}.num_key_value_heads={section['num_key_value_heads']!r} is not supported; "
                          f"supported: num_attention_heads ({heads})")
    return {"builder": "conformer", "num_layers": section.get("num_hidden_layers", 24),
            "hidden_size": section.get("hidden_size", 1024), "num_attention_heads": heads,
            "ffn_hidden_size": section.get("intermediate_size", 4096), "n_mels": section.get("num_mel_bins", 80),
            "subsampling_factor": section.get("subsampling_factor", 8),  # max_frames: the whole-model format sizes it to its language model
            "subsampling_channels": section.get("subsampling_conv_channels", 256),
            "subsampling_kernel_size": section.get("subsampling_conv_kernel_size", 3),
            "subsampling_stride": section.get("subsampling_conv_stride", 2),
            "conv_kernel_size": section.get("conv_kernel_size", 9), "conv_bias": section.get("convolution_bias", True),
            "attention_bias": section.get("attention_bias", True), "scale_input": section.get("scale_input", True)}


def _vit(section: dict, eps: float) -> dict:
    return {"num_layers": section.get("num_hidden_layers", 12), "hidden_size": section.get("hidden_size", 768),
            "num_attention_heads": section.get("num_attention_heads", 12),
            "ffn_hidden_size": section.get("intermediate_size", 3072), "image_size": section.get("image_size", 224),
            "patch_size": section.get("patch_size", 16), "num_channels": section.get("num_channels", 3),
            "transformer": {"layernorm_epsilon": section.get("layer_norm_eps", eps)}}


def mamba2(section: dict, where: str) -> dict:
    """A ``mamba`` node of a Mamba2 language model (every layer a Mamba layer)."""
    layers, heads = section.get("num_hidden_layers", 64), section.get("num_heads", 128)
    # no attention layer: MCore still wants attention heads divisible by TP, as Mamba heads must be
    return {"builder": "mamba", "num_layers": layers, "hybrid_layer_pattern": "M" * layers,
            "hidden_size": section.get("hidden_size", 4096), "num_attention_heads": heads,
            "vocab_size": section.get("vocab_size", 32768), "make_vocab_size_divisible_by": 1,
            "seq_length": section.get("max_position_embeddings", DEFAULT_SEQ_LENGTH),
            "position_embedding_type": "none", "normalization": "RMSNorm",
            "mamba_state_dim": section.get("state_size", 128), "mamba_head_dim": section.get("head_dim", 64),
            "mamba_num_groups": section.get("n_groups", 8), "mamba_num_heads": heads,
            "share_embeddings_and_output_weights": section.get("tie_word_embeddings", True),
            "transformer": {"layernorm_epsilon": section.get("layer_norm_epsilon", 1e-5)}}


def nemotron_h(section: dict, where: str) -> dict:
    """A ``mamba`` node of a Nemotron-H language model (Mamba2, attention without rope, relu2 MLP,
    MoE with a shared expert and sigmoid routing)."""
    from submodels.hf_nemotron_h import hf_pattern

    pattern, field = hf_pattern(section)
    if pattern is None:
        raise ConfigError(f"{where}.{field}: the layer types are not all of mamba, attention, mlp, moe")
    heads = section.get("num_attention_heads", 32)
    transformer = {"add_bias_linear": False, "layernorm_epsilon": section.get("layer_norm_epsilon", 1e-5),
                   "kv_channels": section.get("head_dim", section.get("hidden_size", 4096) // heads)}
    node = {"builder": "mamba", "num_layers": len(pattern), "hybrid_layer_pattern": pattern,
            "hidden_size": section.get("hidden_size", 4096), "num_attention_heads": heads,
            "num_query_groups": section.get("num_key_value_heads", 8),
            "ffn_hidden_size": section.get("intermediate_size", 21504), "vocab_size": section.get("vocab_size", 131072),
            "make_vocab_size_divisible_by": 1, "position_embedding_type": "none", "normalization": "RMSNorm",
            "seq_length": section.get("max_position_embeddings", DEFAULT_SEQ_LENGTH),
            "mamba_state_dim": section.get("ssm_state_size", 128), "mamba_head_dim": section.get("mamba_head_dim", 64),
            "mamba_num_groups": section.get("n_groups", 8), "mamba_num_heads": section.get("mamba_num_heads", 128),
            "mlp_activation": _choice(section, "mlp_hidden_act", {"relu2": "squared_relu"}, where, "relu2"),
            "share_embeddings_and_output_weights": False, "transformer": transformer}
    if "E" in pattern:
        node.update(num_experts=section.get("n_routed_experts", 8),
                    moe_router_topk=section.get("num_experts_per_tok", 2),
                    moe_ffn_hidden_size=section.get("moe_intermediate_size", 7688))
        transformer.update(moe_shared_expert_intermediate_size=section.get("moe_shared_expert_intermediate_size"),
                           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                           moe_router_topk_scaling_factor=section.get("routed_scaling_factor", 1.0))
    return node


NODE_CONFIGS: dict[str, Callable[[dict, str], dict]] = {
    "clip_vision_model": clip_vision, "siglip_vision_model": siglip_vision, "radio": radio_vision,
    "mamba2": mamba2, "nemotron_h": nemotron_h, "parakeet_encoder": parakeet_audio,
}
"""model_type -> the function making the node's fields from its config section."""


def node_config(section: dict, where: str, kinds: tuple[str, ...] | None = None) -> dict:
    """The node fields (``builder`` + config) of the model ``section`` describes; ``kinds`` limits
    the model types accepted (e.g. vision towers only). ``where`` names the section in errors."""
    model_type = section.get("model_type")
    allowed = {t: f for t, f in NODE_CONFIGS.items() if kinds is None or t in kinds}
    if model_type not in allowed:
        raise ConfigError(f"{where}.model_type={model_type!r} cannot be imported here; supported: {sorted(allowed)}")
    return allowed[model_type](section, where)
