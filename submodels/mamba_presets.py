"""Mamba configs with real published shapes (for planning and meta-device builds)."""

from __future__ import annotations

from submodels.mamba import MambaConfig


def mamba2_2p7b(**overrides) -> MambaConfig:
    """Mamba2-2.7B (state-spaces/mamba2-2.7b): 64 Mamba-2 layers, d_model 2560, tied embeddings."""
    return MambaConfig(**{**dict(
        num_layers=64, hidden_size=2560, num_attention_heads=1, hybrid_layer_pattern="M" * 64,
        vocab_size=50277, make_vocab_size_divisible_by=16, seq_length=2048,
        share_embeddings_and_output_weights=True, mamba_state_dim=128, mamba_head_dim=64,
        mamba_num_groups=1), **overrides})


NEMOTRON_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"


def nemotron_h_8b(**overrides) -> MambaConfig:
    """Nemotron-H-8B-Base: 24 Mamba-2, 4 attention (GQA 32/8) and 24 squared-ReLU MLP layers."""
    return MambaConfig(**{**dict(
        num_layers=52, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=21504, hybrid_layer_pattern=NEMOTRON_H_8B_PATTERN, vocab_size=131072,
        seq_length=8192, position_embedding_type="none", mlp_activation="squared_relu",
        mamba_state_dim=128, mamba_head_dim=64, mamba_num_groups=8, mamba_num_heads=128,
        transformer={"kv_channels": 128, "add_bias_linear": False}), **overrides})
