"""The plain Mamba language model: a one-node graph (YAML twin: mamba_lm.yaml)."""

from mimo_builder._internal.document.graph import Graph, Placement
from submodels.mamba import MambaConfig
from submodels.mcore_interop import import_hybrid_config


def mamba_lm(tp: int = 1) -> Graph:
    """A small hybrid Mamba LM on every rank, split ``tp`` ways, the rest data-parallel."""
    backbone = MambaConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, hybrid_layer_pattern="M*-M",
        vocab_size=256, make_vocab_size_divisible_by=1, seq_length=64, position_embedding_type="rope",
        mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2,
    )
    return language_model_graph(backbone, Placement(tp=tp))


def mamba_lm_from_mcore(hybrid_config, *, impl: str | None = None) -> Graph:
    """The one-node graph of MCore's ``HybridModelConfig`` (or its ``as_dict()``): node 'lm' on
    every rank, with the config's parallel sizes as its placement (see docs/interop.md)."""
    imported = import_hybrid_config(hybrid_config, impl=impl)
    return language_model_graph(imported.config, Placement(**imported.placement))


def language_model_graph(backbone: MambaConfig, placement: Placement) -> Graph:
    """Node 'lm' with its token inputs bound to the batch and its loss as the output."""
    return (
        Graph()
        .add("lm", backbone, placement=placement)
        .bind("input_ids", "lm.input_ids")
        .bind("position_ids", "lm.position_ids")
        .bind("labels", "lm.labels")
        .bind("loss_mask", "lm.loss_mask")
        .output("lm.loss")
    )


graph = mamba_lm()
