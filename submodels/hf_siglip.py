"""Hugging Face SigLIP vision tower (``SiglipVisionModel``, or the vision part of ``SiglipModel``
or a LLaVA folder: tensors under ``vision_model.`` or ``vision_tower.``) <-> the vision node with
``layout: siglip`` (MCore's ViT, model_subtype 'siglip').

SigLIP differs from CLIP in what the node's layout covers: no class token, no pre-LayerNorm,
a bias on the patch conv; its layers are named as CLIP's (:func:`submodels.hf_clip.layer_rules`).
Skipped on import: the attention-pooling ``head`` (the node returns hidden states, as LLaVA reads
them), layers after ``feature_layer``, and ``post_layernorm`` unless the node has ``ln_post``.
Export writes ``vision_use_head: false`` (the tower without a head: nothing is missing in
transformers) and ``post_layernorm`` only when the node has ``ln_post``.
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, rename
from submodels.hf_clip import (OLD_BUFFERS, PREFIX, PREFIXES, activation_problems, identity_norm,
                               layer_problems, layer_rules, model_type_problems, tower_fields)

MODEL_TYPE = "siglip_vision_model"
HEAD = PREFIX + "head."  # SiglipMultiheadAttentionPoolingHead (probe, attention, layernorm, mlp)


def siglip_vision_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.vision.VisionConfig` with ``layout: siglip`` to a
    SigLIP vision tower."""
    if cfg.layout != "siglip" or cfg.class_token:
        raise HFWeightsError("SigLIP vision towers have no class token and no pre-LayerNorm; "
                             "set layout: siglip, class_token: false")
    if cfg.num_query_groups not in (None, cfg.num_attention_heads):
        raise HFWeightsError("SigLIP attention has one key/value head per query head; leave num_query_groups unset")
    emb = PREFIX + "embeddings."
    rules = [rename("conv1.weight", emb + "patch_embedding.weight"),
             rename("conv1.bias", emb + "patch_embedding.bias"),
             rename("position_embeddings.weight", emb + "position_embedding.weight")]
    rules += layer_rules(cfg)
    post = PREFIX + "post_layernorm."
    if cfg.ln_post:
        rules += [rename("ln_post.weight", post + "weight"), rename("ln_post.bias", post + "bias")]
    dropped = tuple(f"{PREFIX}encoder.layers.{i}." for i in range(cfg.built_layers, cfg.num_layers))
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config={"model_type": MODEL_TYPE, "architectures": ["SiglipVisionModel"],
                       "num_hidden_layers": cfg.built_layers, "vision_use_head": False},
        skipped=OLD_BUFFERS + (HEAD,) + dropped + (() if cfg.ln_post else (post,)),
        constants=None if cfg.ln_post else (lambda: identity_norm(post, cfg.hidden_size)),
        prefixes=PREFIXES,
        config_section="vision_config",
        extra_checks=lambda hf: (layer_problems(cfg, hf) + activation_problems(hf, "gelu_pytorch_tanh")
                                 + model_type_problems(hf, MODEL_TYPE, "siglip")),
    )


def _expected_fields(cfg) -> dict[str, Expect]:
    """config.json fields with SiglipVisionConfig's defaults (so400m and base differ in size only)."""
    return tower_fields(cfg, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
