"""Hugging Face ``Mamba2ForCausalLM`` <-> the Mamba node (MCore HybridModel, all-Mamba pattern).

Renames only: HF's ``in_proj`` packs z, x, B, C, dt as MCore's does. The vocabulary tables are
padded with zero rows to the node's padded size (and cut back on export).
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, padded_rows, rename
from submodels.hf_llava import language_model_nestings

MIXER = ("dt_bias", "A_log", "D", "in_proj.weight", "out_proj.weight", "norm.weight")
MCORE_MIXER_NORM_EPS = 1e-5  # MambaMixer's gated RMSNorm has a fixed epsilon
MCORE_CONV_KERNEL = 4  # MambaMixer's default d_conv


def mamba2_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.mamba.MambaConfig` to ``Mamba2ForCausalLM``."""
    _require(cfg)
    rules = [padded_rows("embedding.word_embeddings.weight", "backbone.embeddings.weight", cfg.vocab_size)]
    for i in range(cfg.num_layers):
        hf, node = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        rules.append(rename(node + "norm.weight", hf + "norm.weight"))
        rules += [rename(f"{node}mixer.{name}", f"{hf}mixer.{name}") for name in MIXER]
        rules.append(rename(node + "mixer.conv1d_weight", hf + "mixer.conv1d.weight"))
        rules.append(rename(node + "mixer.conv1d_bias", hf + "mixer.conv1d.bias"))
    rules.append(rename("decoder.final_norm.weight", "backbone.norm_f.weight"))
    tied = cfg.share_embeddings_and_output_weights
    if not tied:
        rules.append(padded_rows("output_layer.weight", "lm_head.weight", cfg.vocab_size))
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config={"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"]},
        skipped=("lm_head.",) if tied else (),
        prefixes=("", *language_model_nestings("backbone.")),
        config_section="text_config",
        extra_checks=lambda hf: _eps_problems(hf),
    )


def _require(cfg) -> None:
    others = sorted(set(cfg.layer_symbols) - {"M"})
    if others:
        raise HFWeightsError(f"Hugging Face Mamba2 models have only Mamba layers; hybrid_layer_pattern "
                             f"{cfg.hybrid_layer_pattern!r} also has {others}")
    if cfg.normalization != "RMSNorm" or cfg.position_embedding_type != "none":
        raise HFWeightsError("Hugging Face Mamba2 models use normalization='RMSNorm' and "
                             "position_embedding_type='none'")


def _expected_fields(cfg) -> dict[str, Expect]:
    heads = cfg.mamba_heads
    inner = heads * cfg.mamba_head_dim
    fields = {
        "model_type": Expect("mamba2", "builder 'mamba'"),
        "hidden_size": Expect(cfg.hidden_size, "hidden_size", 4096),
        "num_hidden_layers": Expect(cfg.num_layers, "num_layers", 64),
        "vocab_size": Expect(cfg.vocab_size, "vocab_size", 32768),
        "state_size": Expect(cfg.mamba_state_dim, "mamba_state_dim", 128),
        "head_dim": Expect(cfg.mamba_head_dim, "mamba_head_dim", 64),
        "num_heads": Expect(heads, "mamba_num_heads", 128),
        "n_groups": Expect(cfg.mamba_num_groups, "mamba_num_groups", 8),
        "expand": Expect(inner // cfg.hidden_size if inner % cfg.hidden_size == 0 else inner / cfg.hidden_size,
                         "mamba_num_heads * mamba_head_dim / hidden_size", 2),
        "tie_word_embeddings": Expect(cfg.share_embeddings_and_output_weights,
                                      "share_embeddings_and_output_weights", True),
        "layer_norm_epsilon": Expect(cfg.transformer.get("layernorm_epsilon", 1e-5),
                                     "transformer.layernorm_epsilon", 1e-5),
        "conv_kernel": Expect(MCORE_CONV_KERNEL, "MCore MambaMixer's d_conv", 4),
        "use_conv_bias": Expect(True, "MCore MambaMixer's conv bias", True),
        "use_bias": Expect(False, "MCore MambaMixer's projections without bias", False),
        "hidden_act": Expect("silu", "MCore MambaMixer's SiLU", "silu"),
    }
    if cfg.dtype != "fp32":  # in fp32 the residual is fp32 either way
        fields["residual_in_fp32"] = Expect(bool(cfg.transformer.get("fp32_residual_connection", False)),
                                            "transformer.fp32_residual_connection", True)
    return fields


def _eps_problems(hf: dict) -> list[str]:
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - MCORE_MIXER_NORM_EPS) > 1e-12:
        return [f"config.json layer_norm_epsilon={eps!r}: MCore's Mamba mixer norm uses {MCORE_MIXER_NORM_EPS}"]
    return []
