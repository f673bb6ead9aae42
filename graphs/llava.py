"""llava: a LLaVA-shaped graph (YAML twin: llava.yaml) that ``export --as llava`` writes as a
``LlavaForConditionalGeneration``: a CLIP tower read at its last-but-one layer without its class
token, LLaVA's two-layer projector, a Nemotron-H-style hybrid backbone (no rope, relu-squared MLP,
no linear biases)."""

from graphs import parts
from mimo_builder._internal.document.graph import Graph, Placement
from submodels.mamba import MambaConfig
from submodels.projector import ProjectorConfig
from submodels.vision import VisionConfig

PLACEMENTS = {
    "single": (1, {}),
    "disjoint4": (4, {"vision": Placement(offset=0, size=2), "proj": Placement(offset=0, size=2),
                      "lm": Placement(offset=2, size=2, tp=2)}),
}
DEFAULT = "single"


def tower() -> VisionConfig:
    """A 3-layer CLIP tower over 32 px images in 8 px patches, read at layer 2 without the class token."""
    return VisionConfig(num_layers=3, hidden_size=parts.HIDDEN, num_attention_heads=4, image_size=32, patch_size=8,
                        feature_layer=-2, feature_select="default")


def backbone() -> MambaConfig:
    """A 4-layer hybrid LM ('M*-M') in Nemotron-H's form, the image placeholder at id 1."""
    return MambaConfig(
        num_layers=4, hidden_size=parts.HIDDEN, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        hybrid_layer_pattern="M*-M", vocab_size=256, make_vocab_size_divisible_by=1, seq_length=128,
        position_embedding_type="none", mlp_activation="squared_relu", mamba_state_dim=16, mamba_head_dim=16,
        mamba_num_groups=2, transformer={"add_bias_linear": False}, modality_token_ids={"image": parts.IMAGE_TOKEN},
    )


def llava(placement: str = DEFAULT) -> Graph:
    """The LLaVA-shaped graph under one of :data:`PLACEMENTS`."""
    _, where = PLACEMENTS[placement]
    return (
        Graph()
        .add("vision", tower(), placement=where.get("vision", Placement()))
        .add("proj", ProjectorConfig(input_size=parts.HIDDEN, output_size=parts.HIDDEN, ffn_hidden_size=parts.HIDDEN),
             placement=where.get("proj", Placement()))
        .add("lm", backbone(), placement=where.get("lm", Placement()))
        .connect("vision.embeddings", "proj.input")
        .connect("proj.output", "lm.image")
        .bind("pixel_values", "vision.pixel_values")
        .bind("input_ids", "lm.input_ids")
        .bind("labels", "lm.labels")
        .bind("loss_mask", "lm.loss_mask")
        .output("lm.loss")
    )


graph = llava()
