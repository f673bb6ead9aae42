"""Hugging Face RADIO vision towers (``RadioModel``, or ``vision_model.`` of a Nemotron-Omni
folder) <-> the vision node with ``layout: radio`` (MCore's RADIO ViT, :mod:`submodels.radio`).

Names are those of the files: transformers saves RADIO under the original checkpoint's names
(``radio_model.model.blocks.N.attn.qkv``, q, k and v stacked) and renames them when it loads.
The stacked q/k/v is regrouped per head into ``linear_qkv``. Not read: the input conditioner's mean and std
(the node's ``image_mean`` / ``image_std``, which ``import-hf`` copies from config.json's
``norm_mean`` / ``norm_std``), ``summary_idxs`` (summary tokens are not an output of the node)
and the layer scales, which must be identities (config.json ``layerscale_value: 1.0``, as every
C-RADIO): MCore's transformer layer has no layer scale. Export writes the layer scales as ones.
"""

from __future__ import annotations

import torch

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, Rule, fused_qkv, rename
from mimo_builder._internal.hf.mapping import Nesting
from submodels.hf_clip import activation_problems

MODEL_TYPE = "radio"
LAYER = {"norm1": "input_layernorm", "attn.proj": "self_attention.linear_proj",
         "norm2": "pre_mlp_layernorm", "mlp.fc1": "mlp.linear_fc1", "mlp.fc2": "mlp.linear_fc2"}
MODEL = "radio_model.model."
FINAL_NORM = "vision_final_layernorm."  # Nemotron-Omni's norm after the tower (with MTP layers)
PREFIXES = ("", Nesting(((FINAL_NORM, "vision_projector." + FINAL_NORM), ("", "vision_model."))))
NOT_READ = ("radio_model.input_conditioner.", "radio_model.summary_idxs")


def radio_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.vision.VisionConfig` with ``layout: radio``."""
    if cfg.num_query_groups not in (None, cfg.num_attention_heads):
        raise HFWeightsError("RADIO attention has one key/value head per query head; leave num_query_groups unset")
    emb = MODEL + "patch_generator."
    rules = [rename("embedder.weight", emb + "embedder.weight"), rename("position_embeddings", emb + "pos_embed"),
             rename("class_token", emb + "cls_token.token")]
    if cfg.video_patch_frames:
        rules.append(rename("video_embedder.weight", emb + "video_embedder.weight"))
    if cfg.ln_post:
        rules += [rename(f"ln_post.{kind}", f"{FINAL_NORM}{kind}") for kind in ("weight", "bias")]
    rules += _layer_rules(cfg)
    scales = tuple(f"{MODEL}blocks.{i}.layer_scale{j}." for i in range(cfg.num_layers) for j in (1, 2))
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config=_export_config(cfg),
        skipped=NOT_READ + scales,
        constants=lambda: _constants(cfg, scales),
        prefixes=PREFIXES,
        config_section="vision_config",
        extra_checks=lambda hf: activation_problems(hf, "gelu") + _radio_problems(cfg, hf),
    )


def _constants(cfg, scales: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Identity layer scales, and the summary indices config.json names."""
    summary = _export_config(cfg)["summary_idxs"]
    return {"radio_model.summary_idxs": torch.tensor(summary, dtype=torch.long),
            **{name + "lambda1": torch.ones(cfg.hidden_size) for name in scales}}


def _export_config(cfg) -> dict:
    """What config.json needs beyond the expected fields: summary indices within the class
    tokens, and the node's normalisation as the input conditioner's."""
    config = {"model_type": MODEL_TYPE, "architectures": ["RadioModel"],
              "summary_idxs": list(range(min(2, cfg.class_tokens if cfg.class_token else 0)))}
    for ours, theirs in (("image_mean", "norm_mean"), ("image_std", "norm_std")):
        values = getattr(cfg, ours)
        if values is not None:
            config[theirs] = list(values) * (3 // len(values))
    return config


def _layer_rules(cfg) -> list:
    rules, heads = [], cfg.num_attention_heads
    for i in range(cfg.num_layers):
        hf, node = f"{MODEL}blocks.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            rules += [rename(f"{node}{ours}.{kind}", f"{hf}{theirs}.{kind}") for theirs, ours in LAYER.items()]
            rules.append(stacked_qkv(f"{node}self_attention.linear_qkv.{kind}", f"{hf}attn.qkv.{kind}", heads))
    return rules


def stacked_qkv(param: str, source: str, heads: int) -> Rule:
    """``linear_qkv`` from one tensor holding q, k and v one after the other (as timm's and
    RADIO's ``attn.qkv``), regrouped per head as :func:`fused_qkv` does."""
    per_head = fused_qkv(param, "q", "k", "v", heads, heads)
    return Rule(param, (source,), lambda ts, shape: per_head.join(list(ts[0].chunk(3)), shape),
                lambda t: [torch.cat(per_head.split(t))])


def _expected_fields(cfg) -> dict[str, Expect]:
    """config.json fields with RadioConfig's defaults (C-RADIOv4-H)."""
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return {
        "hidden_size": Expect(cfg.hidden_size, "hidden_size", 1280),
        "num_hidden_layers": Expect(cfg.num_layers, "num_layers", 32),
        "num_attention_heads": Expect(cfg.num_attention_heads, "num_attention_heads", 16),
        "mlp_ratio": Expect(ffn / cfg.hidden_size, "ffn_hidden_size / hidden_size", 4.0),
        "patch_size": Expect(cfg.patch_size, "patch_size", 16),
        "image_size": Expect(cfg.image_size, "image_size", 224),
        "max_img_size": Expect(cfg.largest_image, "max_image_size", 2048),
        "num_channels": Expect(cfg.num_channels, "num_channels", 3),
        "num_cls_tokens": Expect(cfg.class_tokens if cfg.class_token else 0, "class_tokens", 3),
        "num_registers": Expect(cfg.registers, "registers", 7),
        "video_temporal_patch_size": Expect(cfg.video_patch_frames, "video_patch_frames", None),
        "hidden_act": Expect("gelu", "the node's activation 'gelu'", "gelu"),
        "layer_norm_eps": Expect(cfg.transformer.get("layernorm_epsilon", 1e-5), "transformer.layernorm_epsilon", 1e-6),
        "layerscale_value": Expect(1.0, "the node's layers (no layer scale)", 1.0),
        "use_swiglu_ffn": Expect(False, "the node's GELU MLP", False),
        "qkv_bias": Expect(True, "the node's attention biases", True),
        "drop_path_rate": Expect(0.0, "the node's layers (no stochastic depth)", 0.0),
    }


def _radio_problems(cfg, hf: dict) -> list[str]:
    problems = []
    if cfg.activation != "gelu":
        problems.append(f"RADIO's MLP uses exact GELU; the node has activation={cfg.activation!r} (set activation: gelu)")
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        problems.append(f"config.json model_type={hf.get('model_type')!r} but the node has layout='radio' (reads 'radio')")
    return problems
