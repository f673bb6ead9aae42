"""Hugging Face ``NemotronHForCausalLM`` (model_type ``nemotron_h``) <-> the Mamba node's hybrid stack.

Nemotron-H's blocks are one RMSNorm and one mixer each, as MCore's hybrid layers are: Mamba-2
(``M``), attention without rotary embedding (``*``, q/k/v fused into ``linear_qkv``), an ungated
MLP (``-``) and a mixture of experts with sigmoid routing, a correction bias and one shared
expert (``E``). Tensors are renamed, q/k/v fused, vocabulary tables padded; experts are named by
their global index (the loader maps them to each expert-parallel rank's local ones).
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, fused_qkv, padded_rows, rename
from mimo_builder._internal.hf.mapping import Nesting
from submodels.hf_llava import language_model_nestings
from submodels.hf_mamba import MCORE_CONV_KERNEL, MCORE_MIXER_NORM_EPS, MIXER

BLOCKS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
"""config.json ``layers_block_type`` entries -> the pattern's symbols."""

LEGACY_BLOCKS = {"mamba": "linear_attention", "attention": "full_attention"}
"""Older config.json names of the blocks (transformers remaps them the same way)."""

ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu", "relu": "relu", "silu": "silu"}
"""The node's ``mlp_activation`` -> transformers' ``mlp_hidden_act`` that computes the same."""

ROOT = "backbone."
OMNI = Nesting(((ROOT, "language_model.backbone."), ("lm_head.", "language_model.lm_head.")))
"""Where the language model sits in a Nemotron-Omni folder (as transformers saves it)."""


def nemotron_h_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.mamba.MambaConfig` to ``NemotronHForCausalLM``."""
    _require(cfg)
    rules = [padded_rows("embedding.word_embeddings.weight", ROOT + "embeddings.weight", cfg.vocab_size)]
    for i, symbol in enumerate(cfg.layer_symbols):
        rules += LAYER_RULES[symbol](cfg, f"decoder.layers.{i}.", f"{ROOT}layers.{i}.")
    rules.append(rename("decoder.final_norm.weight", ROOT + "norm_f.weight"))
    rules.append(padded_rows("output_layer.weight", "lm_head.weight", cfg.vocab_size))
    return HFMapping(
        rules=tuple(rules),
        expect=_expected_fields(cfg),
        export_config={"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
                       "layers_block_type": [_block(s) for s in cfg.layer_symbols],
                       "tie_word_embeddings": False, "num_nextn_predict_layers": 0},
        skipped=("mtp.",),  # multi-token prediction layers: transformers does not read them either
        prefixes=("", Nesting(((ROOT, "model."), ("lm_head.", "lm_head."))), *language_model_nestings(ROOT), OMNI),
        config_section="text_config",
        extra_checks=lambda hf: _pattern_problems(cfg, hf) + _unmapped_problems(cfg, hf),
    )


def _mamba(cfg, node: str, hf: str) -> list:
    rules = [rename(node + "norm.weight", hf + "norm.weight")]
    rules += [rename(f"{node}mixer.{name}", f"{hf}mixer.{name}") for name in MIXER]
    return rules + [rename(node + "mixer.conv1d_weight", hf + "mixer.conv1d.weight"),
                    rename(node + "mixer.conv1d_bias", hf + "mixer.conv1d.bias")]


def _attention(cfg, node: str, hf: str) -> list:
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    mixer = hf + "mixer."
    return [rename(node + "input_layernorm.weight", hf + "norm.weight"),
            fused_qkv(node + "self_attention.linear_qkv.weight", mixer + "q_proj.weight", mixer + "k_proj.weight",
                      mixer + "v_proj.weight", heads, groups),
            rename(node + "self_attention.linear_proj.weight", mixer + "o_proj.weight")]


def _mlp_pair(node: str, hf: str) -> list:
    """An ungated MLP: MCore's linear_fc1/linear_fc2 are transformers' up_proj/down_proj."""
    return [rename(node + "linear_fc1.weight", hf + "up_proj.weight"),
            rename(node + "linear_fc2.weight", hf + "down_proj.weight")]


def _mlp(cfg, node: str, hf: str) -> list:
    return [rename(node + "pre_mlp_layernorm.weight", hf + "norm.weight"), *_mlp_pair(node + "mlp.", hf + "mixer.")]


def _moe(cfg, node: str, hf: str) -> list:
    mlp, mixer = node + "mlp.", hf + "mixer."
    rules = [rename(node + "pre_mlp_layernorm.weight", hf + "norm.weight"),
             rename(mlp + "router.weight", mixer + "gate.weight"),
             rename(mlp + "router.expert_bias", mixer + "gate.e_score_correction_bias")]
    for e in range(cfg.num_experts):
        rules += _mlp_pair(f"{mlp}experts.local_experts.{e}.", f"{mixer}experts.{e}.")
    return rules + _mlp_pair(mlp + "shared_experts.", mixer + "shared_experts.")


LAYER_RULES = {"M": _mamba, "*": _attention, "-": _mlp, "E": _moe}


def _block(symbol: str) -> str:
    return next(name for name, s in BLOCKS.items() if s == symbol)


def _require(cfg) -> None:
    """Node settings no Nemotron-H model has: refused by name before any folder is read."""
    t, symbols = cfg.transformer, set(cfg.layer_symbols)
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append("normalization: Nemotron-H uses RMSNorm")
    if cfg.position_embedding_type != "none":
        problems.append("position_embedding_type: Nemotron-H's attention has no position embedding; set 'none'")
    if cfg.share_embeddings_and_output_weights:
        problems.append("share_embeddings_and_output_weights: transformers' NemotronHForCausalLM never ties "
                        "lm_head to the embeddings; set false")
    if symbols & {"*", "-", "E"} and t.get("add_bias_linear", True):
        problems.append("transformer.add_bias_linear: Nemotron-H's attention, MLP and expert linears have no "
                        "bias; set false")
    if t.get("gated_linear_unit"):
        problems.append("transformer.gated_linear_unit: Nemotron-H's MLPs are not gated")
    if t.get("qk_layernorm"):
        problems.append("transformer.qk_layernorm: Nemotron-H's attention has no query/key norm")
    if "E" in symbols:
        problems += _moe_requirements(t)
    if problems:
        raise HFWeightsError("the node cannot be a Hugging Face Nemotron-H model: " + "; ".join(problems))


def _moe_requirements(t: dict) -> list[str]:
    out = []
    if t.get("moe_router_score_function", "softmax") != "sigmoid":
        out.append("transformer.moe_router_score_function: Nemotron-H routes with sigmoid scores; set 'sigmoid'")
    if not t.get("moe_router_enable_expert_bias", False):
        out.append("transformer.moe_router_enable_expert_bias: Nemotron-H's router has a score correction "
                   "bias (e_score_correction_bias); set true")
    if not t.get("moe_shared_expert_intermediate_size"):
        out.append("transformer.moe_shared_expert_intermediate_size: every Nemotron-H MoE layer has one shared "
                   "expert; set its width")
    if t.get("moe_router_num_groups") or t.get("moe_router_group_topk"):
        out.append("transformer.moe_router_num_groups/moe_router_group_topk: group-limited routing is not "
                   "mapped (config.json n_group=1, topk_group=1)")
    if t.get("moe_latent_size"):
        out.append("transformer.moe_latent_size: MoE latent projections are not mapped")
    return out


def _expected_fields(cfg) -> dict[str, Expect]:
    t, symbols = cfg.transformer, set(cfg.layer_symbols)
    fields = {
        "model_type": Expect("nemotron_h", "builder 'mamba' with a hybrid pattern"),
        "hidden_size": Expect(cfg.hidden_size, "hidden_size", 4096),
        "vocab_size": Expect(cfg.vocab_size, "vocab_size", 131072),
        "layer_norm_epsilon": Expect(t.get("layernorm_epsilon", 1e-5), "transformer.layernorm_epsilon", 1e-5),
    }
    if "M" in symbols:
        fields.update(_mamba_fields(cfg))
    if "*" in symbols:
        heads = cfg.num_attention_heads
        fields.update({
            "num_attention_heads": Expect(heads, "num_attention_heads", 32),
            "num_key_value_heads": Expect(cfg.num_query_groups or heads, "num_query_groups", 8),
            "head_dim": Expect(t.get("kv_channels") or cfg.hidden_size // heads, "transformer.kv_channels", 128),
        })
    if symbols & {"-", "E"}:
        fields["mlp_hidden_act"] = Expect(ACTIVATIONS[cfg.mlp_activation], f"mlp_activation={cfg.mlp_activation!r}, "
                                          "i.e. mlp_hidden_act", "relu2")
        fields["mlp_bias"] = Expect(False, "transformer.add_bias_linear", False)
    if "-" in symbols:
        fields["intermediate_size"] = Expect(cfg.ffn_hidden_size or 4 * cfg.hidden_size, "ffn_hidden_size", 21504)
    if "E" in symbols:
        fields.update(_moe_fields(cfg))
    return fields


def _mamba_fields(cfg) -> dict[str, Expect]:
    return {
        "ssm_state_size": Expect(cfg.mamba_state_dim, "mamba_state_dim", 128),
        "mamba_head_dim": Expect(cfg.mamba_head_dim, "mamba_head_dim", 64),
        "mamba_num_heads": Expect(cfg.mamba_heads, "mamba_num_heads", 128),
        "n_groups": Expect(cfg.mamba_num_groups, "mamba_num_groups", 8),
        "conv_kernel": Expect(MCORE_CONV_KERNEL, "MCore MambaMixer's d_conv", 4),
        "use_conv_bias": Expect(True, "MCore MambaMixer's conv bias", True),
        "use_bias": Expect(False, "MCore MambaMixer's projections without bias", False),
        "mamba_hidden_act": Expect("silu", "MCore MambaMixer's SiLU", "silu"),
    }


def _moe_fields(cfg) -> dict[str, Expect]:
    t = cfg.transformer
    width = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return {
        "n_routed_experts": Expect(cfg.num_experts, "num_experts", 8),
        "num_experts_per_tok": Expect(cfg.moe_router_topk, "moe_router_topk", 2),
        "moe_intermediate_size": Expect(width, "moe_ffn_hidden_size", 7688),
        "moe_shared_expert_intermediate_size": Expect(t.get("moe_shared_expert_intermediate_size"),
                                                      "transformer.moe_shared_expert_intermediate_size", 7688),
        "routed_scaling_factor": Expect(float(t.get("moe_router_topk_scaling_factor") or 1.0),
                                        "transformer.moe_router_topk_scaling_factor", 1.0),
        # MCore's sigmoid router divides the chosen scores by their sum exactly when topk > 1
        "norm_topk_prob": Expect(cfg.moe_router_topk > 1, "moe_router_topk > 1 (MCore normalises the "
                                 "sigmoid scores of more than one expert)", True),
        "n_group": Expect(1, "MCore's router without expert groups", 1),
        "topk_group": Expect(1, "MCore's router without expert groups", 1),
    }


def hf_pattern(hf: dict) -> tuple[str | None, str]:
    """The layer pattern config.json describes and the field it came from (``layers_block_type``,
    legacy names remapped, else the older ``hybrid_override_pattern``); None when neither is there
    or a block type is unknown."""
    blocks = hf.get("layers_block_type")
    if isinstance(blocks, list):
        names = [LEGACY_BLOCKS.get(b, b) for b in blocks]
        return ("".join(BLOCKS[b] for b in names) if all(b in BLOCKS for b in names) else None), "layers_block_type"
    pattern = hf.get("hybrid_override_pattern")
    if isinstance(pattern, str) and set(pattern) <= set(BLOCKS.values()):
        return pattern, "hybrid_override_pattern"
    return None, "layers_block_type"


def _pattern_problems(cfg, hf: dict) -> list[str]:
    pattern, field = hf_pattern(hf)
    if pattern is None:
        return [f"config.json {field}={hf.get(field)!r} is not a list of {sorted(BLOCKS)} blocks"]
    if pattern != cfg.layer_symbols:
        return [f"config.json {field} is the pattern {pattern!r} but the node has hybrid_layer_pattern="
                f"{cfg.hybrid_layer_pattern!r}"]
    return []


def _unmapped_problems(cfg, hf: dict) -> list[str]:
    """config.json settings the kind cannot honour at all, whatever the node's config says."""
    out = []
    symbols = set(cfg.layer_symbols)
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if "M" in symbols and abs(eps - MCORE_MIXER_NORM_EPS) > 1e-12:
        out.append(f"config.json layer_norm_epsilon={eps!r}: MCore's Mamba mixer norm uses {MCORE_MIXER_NORM_EPS}")
    act = hf.get("mlp_hidden_act", "relu2")
    if symbols & {"-", "E"} and act not in ACTIVATIONS.values():
        offered = ", ".join(f"{hf_name} ({ours})" for ours, hf_name in ACTIVATIONS.items())
        out.append(f"config.json mlp_hidden_act={act!r}: the mamba kind's mlp_activation offers only {offered}")
    if "E" in symbols and hf.get("moe_latent_size") is not None:
        out.append(f"config.json moe_latent_size={hf['moe_latent_size']!r}: MoE latent projections "
                   "(fc1_latent_proj/fc2_latent_proj) are not mapped (MCore builds them only with Transformer "
                   "Engine)")
    return out
