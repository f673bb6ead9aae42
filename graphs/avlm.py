"""avlm: vision and audio encoders -> their projectors -> Mamba backbone (YAML twin: avlm.yaml)."""

from graphs import parts
from mimo_builder._internal.document.graph import Graph, Placement

ALL = Placement()
ENCODERS = ("vision", "vision_proj", "audio", "audio_proj")
# name -> (world size, {node: placement}); nodes not named get ALL.
PLACEMENTS = {
    "single": (1, {}),
    "colocated_tp2": (2, {name: Placement(tp=2) for name in (*ENCODERS, "lm")}),
    "colocated_dp2": (2, {}),
    "colocated4": (4, {"lm": Placement(tp=2)}),
    "disjoint4": (4, {**{name: Placement(offset=0, size=2) for name in ENCODERS},
                      "lm": Placement(offset=2, size=2, tp=2)}),
}
DEFAULT = "disjoint4"


def avlm(placement: str = DEFAULT) -> Graph:
    """The audio-vision-language graph under one of :data:`PLACEMENTS`."""
    _, where = PLACEMENTS[placement]
    backbone = parts.backbone(image=parts.IMAGE_TOKEN, audio=parts.AUDIO_TOKEN)
    graph = Graph()
    for name, config in (("vision", parts.vision()), ("vision_proj", parts.projector()),
                         ("audio", parts.audio()), ("audio_proj", parts.projector()), ("lm", backbone)):
        graph.add(name, config, placement=where.get(name, ALL))
    return (
        graph.connect("vision.embeddings", "vision_proj.input")
        .connect("audio.embeddings", "audio_proj.input")
        .connect("vision_proj.output", "lm.image")
        .connect("audio_proj.output", "lm.audio")
        .bind("pixel_values", "vision.pixel_values")
        .bind("audio_features", "audio.features")
        .bind("input_ids", "lm.input_ids")
        .bind("labels", "lm.labels")
        .bind("loss_mask", "lm.loss_mask")
        .output("lm.loss")
    )


graph = avlm()
