"""omni: a Nemotron-Omni-shaped graph (YAML twin: omni.yaml) that ``export --as nemotron_h_omni``
writes as transformers' ``NemotronH_Omni_Reasoning_V3``: a RADIO tower (class and register tokens,
2 x 2 pixel shuffle, its video projection held), Nemotron-Omni's RMSNorm / squared-ReLU projectors,
a Parakeet conformer over log-mel frames, and a Nemotron-H-style hybrid backbone."""

from graphs import parts
from graphs.llava import backbone as nemotron_h_backbone
from mimo_builder._internal.document.graph import Graph, Placement
from submodels.conformer_config import ConformerConfig
from submodels.projector import ProjectorConfig
from submodels.vision import VisionConfig

PLACEMENTS = {
    "single": (1, {}),
    "disjoint4": (4, {"vision": Placement(offset=0, size=2), "proj": Placement(offset=0, size=2),
                      "audio": Placement(offset=0, size=2), "audio_proj": Placement(offset=0, size=2),
                      "lm": Placement(offset=2, size=2, tp=2)}),
}
DEFAULT = "single"


def tower() -> VisionConfig:
    """A 2-layer RADIO tower over 32 px images (up to 64 px) in 8 px patches: 4 x 4 patches, 2 x 2
    tokens of 4 * HIDDEN features after the pixel shuffle."""
    return VisionConfig(layout="radio", num_layers=2, hidden_size=parts.HIDDEN, num_attention_heads=4,
                        ffn_hidden_size=2 * parts.HIDDEN, image_size=32, max_image_size=64, patch_size=8,
                        class_tokens=2, registers=2, pixel_shuffle=2, video_patch_frames=2, activation="gelu",
                        transformer={"layernorm_epsilon": 1e-6})


def sound() -> ConformerConfig:
    """A 2-layer Parakeet conformer over 16 mel bins, subsampled 4x (64 frames give 16 tokens)."""
    return ConformerConfig(num_layers=2, hidden_size=parts.HIDDEN, num_attention_heads=4,
                           ffn_hidden_size=2 * parts.HIDDEN, n_mels=16, max_frames=64, subsampling_factor=4,
                           subsampling_channels=8, conv_kernel_size=5, attention_bias=False, scale_input=False)


def projector(input_size: int, hf_format: str) -> ProjectorConfig:
    """Nemotron-Omni's projector: RMSNorm, linear, squared ReLU, linear, no biases."""
    return ProjectorConfig(input_size=input_size, output_size=parts.HIDDEN, ffn_hidden_size=2 * parts.HIDDEN,
                           activation="relu2", norm="rmsnorm", hf_format=hf_format,
                           transformer={"add_bias_linear": False})


def backbone():
    """The LLaVA graph's Nemotron-H-style backbone ('M*-M'), with image (1) and audio (2) placeholders."""
    config = nemotron_h_backbone()
    return config.model_copy(update={"modality_token_ids": {"image": parts.IMAGE_TOKEN, "audio": parts.AUDIO_TOKEN}})


def omni(placement: str = DEFAULT) -> Graph:
    """The Nemotron-Omni-shaped graph under one of :data:`PLACEMENTS`."""
    _, where = PLACEMENTS[placement]
    nodes = {"vision": tower(), "proj": projector(4 * parts.HIDDEN, "nemotron_omni_vision"), "audio": sound(),
             "audio_proj": projector(parts.HIDDEN, "nemotron_omni_audio"), "lm": backbone()}
    graph = Graph()
    for name, config in nodes.items():
        graph.add(name, config, placement=where.get(name, Placement()))
    return (graph.connect("vision.embeddings", "proj.input").connect("proj.output", "lm.image")
            .connect("audio.embeddings", "audio_proj.input").connect("audio_proj.output", "lm.audio")
            .bind("pixel_values", "vision.pixel_values").bind("audio_features", "audio.features")
            .bind("input_ids", "lm.input_ids").bind("labels", "lm.labels").bind("loss_mask", "lm.loss_mask")
            .output("lm.loss"))


graph = omni()
