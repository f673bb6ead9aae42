"""The plain Mamba language model: a one-node graph (YAML twin: mamba_lm.yaml)."""

from mimo_builder.graph import Graph, Placement
from submodels.mamba import MambaConfig


def mamba_lm(tp: int = 1) -> Graph:
    """A small hybrid Mamba LM on every rank, split ``tp`` ways, the rest data-parallel."""
    backbone = MambaConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, hybrid_layer_pattern="M*-M",
        vocab_size=256, make_vocab_size_divisible_by=1, seq_length=64, position_embedding_type="rope",
        mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2,
    )
    return (
        Graph()
        .add("lm", backbone, placement=Placement(tp=tp))
        .bind("input_ids", "lm.input_ids")
        .bind("position_ids", "lm.position_ids")
        .bind("labels", "lm.labels")
        .bind("loss_mask", "lm.loss_mask")
        .output("lm.loss")
    )


graph = mamba_lm()
