"""vlm: vision encoder -> projector -> Mamba backbone (YAML twin of the default: vlm.yaml)."""

from graphs import parts
from mimo_builder._internal.document.graph import Graph, Placement

ALL = Placement()
# name -> (world size, {node: placement}); nodes not named get ALL.
PLACEMENTS = {
    "single": (1, {}),
    "colocated_tp2": (2, {"vision": Placement(tp=2), "proj": Placement(tp=2), "lm": Placement(tp=2)}),
    "colocated_dp2": (2, {}),
    "colocated4": (4, {"lm": Placement(tp=2)}),
    "disjoint4": (4, {"vision": Placement(offset=0, size=2), "proj": Placement(offset=0, size=2),
                      "lm": Placement(offset=2, size=2, tp=2)}),
}
DEFAULT = "disjoint4"


def vlm(placement: str = DEFAULT) -> Graph:
    """The vision-language graph under one of :data:`PLACEMENTS`."""
    _, where = PLACEMENTS[placement]
    return (
        Graph()
        .add("vision", parts.vision(), placement=where.get("vision", ALL))
        .add("proj", parts.projector(), placement=where.get("proj", ALL))
        .add("lm", parts.backbone(image=parts.IMAGE_TOKEN), placement=where.get("lm", ALL))
        .connect("vision.embeddings", "proj.input")
        .connect("proj.output", "lm.image")
        .bind("pixel_values", "vision.pixel_values")
        .bind("input_ids", "lm.input_ids")
        .bind("labels", "lm.labels")
        .bind("loss_mask", "lm.loss_mask")
        .output("lm.loss")
    )


graph = vlm()
