"""The ViT image encoder node's config: its fields and their checks, as pure data (pydantic only).

It lives apart from its builder (:mod:`submodels.vision`) so the document's JSON Schema
(``mimo-builder schema``) imports neither torch nor Megatron-Core; the entry-point group
``mimo_builder.configs`` names it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from mimo_builder._internal.document.types import NonNegativeInt, PositiveInt, StrictBool, StrictInt
from mimo_builder._internal.kinds.transformer_fields import TransformerModelConfig

class VisionConfig(TransformerModelConfig):
    """A ViT image encoder: conv patches, learned positions, pre-norm layers; CLIP's layout (class
    token, LayerNorm before the first layer), SigLIP's (neither; a bias on the patch conv) or
    RADIO's (class and register tokens without positions, cropped position embeddings, patch
    features only, optionally pixel-shuffled as Nemotron-Omni feeds its projector)."""

    builder: str = "vision"
    """Builder of this node (registered name or 'module:Class')."""

    image_size: PositiveInt
    """Height and width of the (square) input image in pixels."""

    patch_size: PositiveInt
    """Height and width of one patch; must divide image_size, except with layout 'siglip', whose
    patch conv drops the remainder as SigLIP's does (so400m-patch14-384: 27 x 27 patches)."""

    max_image_size: PositiveInt | None = None
    """Largest height or width of an image in a list of images (ragged items, any size that is a
    multiple of patch_size up to this; None: image_size). The learned positions stay those of
    image_size, interpolated (bicubic, as CLIP and SigLIP do) for other grids."""

    num_channels: PositiveInt = 3
    """Channels of the input image."""

    image_mean: tuple[float, ...] | None = None
    """Per-channel mean that image files are normalised with after scaling to [0, 1] (None: CLIP's;
    ``[0.5]`` with ``image_std: [0.5]`` maps pixels to [-1, 1]); one value serves every channel."""

    image_std: tuple[float, ...] | None = None
    """Per-channel standard deviation for image files (None: CLIP's), each above 0."""

    layout: Literal["clip", "siglip", "radio"] = "clip"
    """Tower layout and Hugging Face format: 'clip' (LayerNorm before the first layer, patch conv
    without bias), 'siglip' (neither: patch conv with bias; needs class_token: false) or 'radio'
    (MCore's RADIO ViT: a position table of max_image_size cropped to each image, class and
    register tokens dropped from the output; see submodels.radio)."""

    class_token: StrictBool = True
    """Prepend learned class tokens to the patch tokens (CLIP has one; SigLIP none)."""

    class_tokens: PositiveInt = 1
    """How many class tokens class_token prepends (RADIO's num_cls_tokens; 1 otherwise)."""

    registers: NonNegativeInt = 0
    """Learned register tokens after the class tokens (RADIO's num_registers; layout 'radio' only)."""

    pixel_shuffle: PositiveInt = 1
    """Merge each s x s block of output patches into one token of s * s * hidden_size features
    (Nemotron-Omni's pixel shuffle, downsample_ratio 1/s); layout 'radio' only; image sides must
    then be multiples of patch_size * s."""

    video_patch_frames: PositiveInt | None = None
    """Frames per tubelet of RADIO's video patch projection (video_temporal_patch_size): a video's
    frames are grouped this many at a time (the last frame repeated to fill the last tubelet),
    each tubelet runs through the video projection and brings one image's tokens, as
    Nemotron-Omni's video path. Unset: frames run one by one as images. Layout 'radio' only."""

    activation: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
    """MLP activation (CLIP uses quick_gelu; SigLIP gelu_tanh, transformers' gelu_pytorch_tanh)."""

    ln_post: StrictBool = False
    """LayerNorm over every output token after the last built layer (CLIP's and SigLIP's post_layernorm)."""

    feature_layer: StrictInt = -1
    """Which layer's output the node returns, counted from the end as Hugging Face's
    hidden_states: -1 the last, -2 the one before (LLaVA); layers after it are not built."""

    feature_select: Literal["full", "default"] = "full"
    """Which output tokens the node returns, as LLaVA's ``vision_feature_select_strategy``:
    'full' every token, 'default' all but the first (the class token of a CLIP tower)."""

    @property
    def prefix_tokens(self) -> int:
        """Class and register tokens before the patches (RADIO drops them from its output)."""
        return self.class_tokens * int(self.class_token) + self.registers

    @property
    def output_width(self) -> int:
        """Features per output token: hidden_size, times pixel_shuffle squared."""
        return self.hidden_size * self.pixel_shuffle ** 2

    @property
    def dropped_tokens(self) -> int:
        """Leading output tokens the node drops (``feature_select: default``: one)."""
        return int(self.feature_select == "default")

    @property
    def built_layers(self) -> int:
        """Layers the node builds and runs: num_layers up to feature_layer."""
        return self.num_layers + 1 + self.feature_layer

    @property
    def largest_image(self) -> int:
        """The largest height or width an item may have (max_image_size, else image_size)."""
        return self.max_image_size or self.image_size

    def image_tokens(self, height: int, width: int) -> int:
        """Output tokens of one [C, height, width] image; a ValueError for a size the tower refuses."""
        p, top = self.patch_size * self.pixel_shuffle, self.largest_image
        if height % p or width % p or not 0 < height <= top or not 0 < width <= top:
            unit = f"patch_size {self.patch_size}" + (f" x pixel_shuffle {self.pixel_shuffle}" if p != self.patch_size else "")
            raise ValueError(f"an image of {height} x {width} pixels: height and width must be multiples of "
                             f"{unit} from {p} to {top} (max_image_size)")
        return self._tokens((height // self.patch_size) * (width // self.patch_size))

    def _tokens(self, patches: int) -> int:
        """Output tokens of an image of ``patches`` patches."""
        if self.layout == "radio":
            return patches // self.pixel_shuffle ** 2
        return patches + int(self.class_token) - self.dropped_tokens

    @property
    def grid_pixels(self) -> int:
        """Pixels per side the patch grid covers: image_size less SigLIP's dropped remainder."""
        return self.image_size - self.image_size % self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Output tokens per image: the patches plus the class token if any, less the dropped ones
        (RADIO: the patches only, over pixel_shuffle squared)."""
        return self._tokens(self.num_patches)

    @model_validator(mode="after")
    def _check_radio(self) -> "VisionConfig":
        if self.layout == "radio":
            return self._radio_problems()
        for name, plain in (("registers", 0), ("pixel_shuffle", 1), ("video_patch_frames", None), ("class_tokens", 1)):
            if getattr(self, name) != plain:
                raise ValueError(f"{name} is a field of layout 'radio'; the node has layout {self.layout!r}")
        return self

    def _radio_problems(self) -> "VisionConfig":
        unit = self.patch_size * self.pixel_shuffle
        if self.num_channels != 3:
            raise ValueError(f"layout 'radio' takes 3 channels (MCore's RADIO embedder); num_channels is {self.num_channels}")
        if self.feature_select != "full":
            raise ValueError("layout 'radio' returns the patch features only (class and register tokens "
                             "dropped); leave feature_select 'full'")
        if self.image_size % unit or self.largest_image % unit:
            raise ValueError(f"image_size {self.image_size} and max_image_size {self.largest_image} must be "
                             f"multiples of patch_size x pixel_shuffle = {unit}")
        if self.largest_image < self.image_size:
            raise ValueError(f"max_image_size {self.largest_image} is below image_size {self.image_size}")
        if self.video_patch_frames == 1:
            raise ValueError("video_patch_frames must be at least 2 (or unset), as RADIO's video_temporal_patch_size")
        return self

    @model_validator(mode="after")
    def _check_patches(self) -> "VisionConfig":
        if self.layout == "siglip" and self.class_token:
            raise ValueError("layout 'siglip' has no class token; set class_token: false")
        if self.image_size % self.patch_size and self.layout != "siglip":
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                             "choose a patch_size that divides it (layout 'siglip' drops the remainder)")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.num_channels):
                raise ValueError(f"{name} holds {len(values)} values; give 1 or num_channels ({self.num_channels})")
        if self.image_std is not None and not all(s > 0 for s in self.image_std):
            raise ValueError(f"image_std {self.image_std} must be above 0 in every channel")
        if self.max_image_size is not None and self.max_image_size % self.patch_size:
            raise ValueError(f"max_image_size {self.max_image_size} is not a multiple of patch_size {self.patch_size}")
        if not -self.num_layers <= self.feature_layer <= -1:
            raise ValueError(f"feature_layer {self.feature_layer} must be in [-num_layers, -1] = "
                             f"[{-self.num_layers}, -1]")
        return self

    def pp_problems(self, pp: int) -> list[str]:
        """Why this encoder cannot be split over ``pp`` pipeline stages (empty when it can)."""
        return [] if pp == 1 else [f"the vision encoder runs on one pipeline stage, not pp {pp}"]
