"""Hugging Face CLIP vision tower (``CLIPVisionModel``, or the vision part of ``CLIPModel`` or a
LLaVA folder: tensors under ``vision_model.`` or ``vision_tower.``) <-> the vision node (MCore ViT).

q/k/v are fused per head into ``linear_qkv``; the class embedding gains two unit axes. Layers
after the node's ``feature_layer`` are not built, so their tensors are skipped; so is
``post_layernorm`` unless the node has ``ln_post``.
"""

from __future__ import annotations

import torch

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, fused_qkv, rename, reshaped

PREFIX = ""  # CLIPVisionModel's own names (transformers 5); larger models nest them, see PREFIXES
PREFIXES = ("", "vision_model.", "vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
            "model.vision_tower.vision_model.")
OLD_BUFFERS = ("embeddings.position_ids",)  # saved by older transformers versions
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # ours -> hidden_act
LAYER = {"layer_norm1": "input_layernorm", "self_attn.out_proj": "self_attention.linear_proj",
         "layer_norm2": "pre_mlp_layernorm", "mlp.fc1": "mlp.linear_fc1", "mlp.fc2": "mlp.linear_fc2"}


def clip_vision_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.vision.VisionConfig` to a CLIP vision tower."""
    if not cfg.class_token:
        raise HFWeightsError("CLIP vision towers have a class token; set class_token: true")
    if cfg.num_query_groups not in (None, cfg.num_attention_heads):
        raise HFWeightsError("CLIP attention has one key/value head per query head; leave num_query_groups unset")
    h = cfg.hidden_size
    emb = PREFIX + "embeddings."
    rules = [reshaped("class_token", emb + "class_embedding", (h,)),
             rename("conv1.weight", emb + "patch_embedding.weight"),
             rename("position_embeddings.weight", emb + "position_embedding.weight"),
             rename("ln_pre.weight", PREFIX + "pre_layrnorm.weight"),
             rename("ln_pre.bias", PREFIX + "pre_layrnorm.bias")]
    rules += layer_rules(cfg)
    post = PREFIX + "post_layernorm."
    if cfg.ln_post:
        rules += [rename("ln_post.weight", post + "weight"), rename("ln_post.bias", post + "bias")]
    dropped = tuple(f"{PREFIX}encoder.layers.{i}." for i in range(cfg.built_layers, cfg.num_layers))
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config={"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
                       "num_hidden_layers": cfg.built_layers},
        skipped=OLD_BUFFERS + dropped + (() if cfg.ln_post else (post,)),
        constants=None if cfg.ln_post else (lambda: identity_norm(post, cfg.hidden_size)),
        prefixes=PREFIXES,
        config_section="vision_config",
        extra_checks=lambda hf: (layer_problems(cfg, hf) + activation_problems(hf, "quick_gelu")
                                 + model_type_problems(hf, "clip_vision_model", "clip")),
    )


def layer_rules(cfg) -> list:
    """The built layers' rules (CLIP's and SigLIP's encoder layers are named alike): norms,
    out_proj, fc1 and fc2 renamed, q/k/v weights and biases fused per head."""
    rules, heads = [], cfg.num_attention_heads
    for i in range(cfg.built_layers):
        hf, node = f"{PREFIX}encoder.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            rules += [rename(f"{node}{ours}.{kind}", f"{hf}{theirs}.{kind}") for theirs, ours in LAYER.items()]
            q, k, v = (f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv")
            rules.append(fused_qkv(f"{node}self_attention.linear_qkv.{kind}", q, k, v, heads, heads))
    return rules


def activation_problems(hf: dict, default: str) -> list[str]:
    """A config.json hidden_act the vision kind has no activation for."""
    have = hf.get("hidden_act", default)
    if have in ACTIVATIONS.values():
        return []
    return [f"config.json hidden_act={have!r}: the vision kind has no such activation "
            f"(it has {', '.join(ACTIVATIONS.values())})"]


def model_type_problems(hf: dict, model_type: str, layout: str) -> list[str]:
    """A config.json model_type (when given) of another vision tower than the node's ``layout`` reads."""
    have = hf.get("model_type")
    if have is None or have == model_type:
        return []
    hint = {"siglip_vision_model": "layout: siglip, class_token: false", "clip_vision_model": "layout: clip"}
    fix = f"; set {hint[have]}" if have in hint else ""
    return [f"config.json model_type={have!r} but the node has layout={layout!r} (reads {model_type!r}){fix}"]


def _expected_fields(cfg) -> dict[str, Expect]:
    return tower_fields(cfg, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def tower_fields(cfg, **defaults) -> dict[str, Expect]:
    """The config.json fields a CLIP-like tower fixes (CLIP and SigLIP name them alike), with the
    model's own ``defaults`` for ``patch_size``, ``hidden_act`` and ``layer_norm_eps``."""
    return {
        "hidden_size": Expect(cfg.hidden_size, "hidden_size", 768),
        "intermediate_size": Expect(cfg.ffn_hidden_size or 4 * cfg.hidden_size, "ffn_hidden_size", 3072),
        "num_attention_heads": Expect(cfg.num_attention_heads, "num_attention_heads", 12),
        "num_channels": Expect(cfg.num_channels, "num_channels", 3),
        "image_size": Expect(cfg.image_size, "image_size", 224),
        "patch_size": Expect(cfg.patch_size, "patch_size", defaults["patch_size"]),
        "hidden_act": Expect(ACTIVATIONS[cfg.activation], "activation", defaults["hidden_act"]),
        "layer_norm_eps": Expect(cfg.transformer.get("layernorm_epsilon", 1e-5), "transformer.layernorm_epsilon",
                                 defaults["layer_norm_eps"]),
    }


def layer_problems(cfg, hf: dict) -> list[str]:
    """config.json num_hidden_layers other than the node's num_layers or its built layers."""
    layers = hf.get("num_hidden_layers", 12)
    if layers in (cfg.num_layers, cfg.built_layers):
        return []
    return [f"config.json num_hidden_layers={layers} but the node has num_layers={cfg.num_layers} "
            f"(feature_layer={cfg.feature_layer} builds {cfg.built_layers})"]


def identity_norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
    """A LayerNorm's freshly initialised tensors (weight 1, bias 0), written on export for a
    ``post_layernorm`` the node does not build (``ln_post: false``), as transformers would
    initialise it if absent: the folder loads without missing keys, with the same outputs."""
    return {prefix + "weight": torch.ones(width), prefix + "bias": torch.zeros(width)}
