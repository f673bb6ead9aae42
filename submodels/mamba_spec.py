"""The hybrid stack's layer specs: MCore's Transformer Engine spec, or the same structure with torch
norms, local linears and the CPU context-parallel attention (checkpoint keys named as TE names them)."""

from __future__ import annotations

from submodels import mamba_kernels

mamba_kernels.ensure_mamba_ssm_importable()  # before MCore's mixer is imported

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules  # noqa: E402
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules  # noqa: E402
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules  # noqa: E402
from megatron.core.ssm.mlp_layer import MLPLayer  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_layer import (  # noqa: E402
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from submodels.context_parallel import ContextParallelAttention  # noqa: E402


def hybrid_stack_spec(te: bool, num_experts: int | None = None, attention: type = ContextParallelAttention) -> ModuleSpec:
    """MCore's TE hybrid spec, or the same structure with torch norms, local linears and the
    ``attention`` core attention."""
    if te:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_spec

        return te_spec
    return local_hybrid_stack_spec(num_experts, attention)


# Checkpoint keys of the local spec's separate norms under the names Transformer Engine gives them
# (fused into the next linear), as MCore's own local specs map them: checkpoints do not depend
# on the spec. The MoE layer's norm stays separate in the TE spec too.
FUSED_NORM_KEYS = {
    "mamba": {"norm.": "mixer.in_proj.layer_norm_"},
    "attention": {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
    "mlp": {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
}


def local_hybrid_stack_spec(num_experts: int | None = None, attention: type = ContextParallelAttention) -> ModuleSpec:
    """Hybrid stack without Transformer Engine: separate norms, Column/RowParallelLinear, local
    attention; checkpoint keys as the TE spec names them."""
    norm = WrappedTorchNorm
    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=norm,
        mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map=FUSED_NORM_KEYS["mamba"]))
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                               core_attention=attention,
                                               linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add, sharded_state_dict_keys_map=FUSED_NORM_KEYS["attention"]))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm, mlp=get_mlp_module_spec(use_te=False), mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=FUSED_NORM_KEYS["mlp"]))
    layers = dict(mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp)
    if num_experts is not None:
        layers["moe_layer"] = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(**layers))
