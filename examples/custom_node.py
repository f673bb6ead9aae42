"""A node kind written outside the project: a patch-MLP image encoder from plain torch layers.

No transformer, no MCore layers: ``build_model`` returns a plain ``torch.nn.Module`` and the
framework wraps it for MCore's DDP. ``examples/custom_graph.yaml`` uses it as
``builder: examples.custom_node:PatchMLPBuilder``; from the repository root::

    mimo-builder --allow examples validate examples/custom_graph.yaml
    mimo-builder --allow examples run examples/custom_graph.yaml --nproc 2 --steps 3

docs/extending.md explains each part.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mimo_builder.kinds import ModelBuilder, ModelConfig, Port, Ports, PositiveInt


class PatchMLPConfig(ModelConfig):
    """Cut an image into square patches and embed each patch with a two-layer MLP."""

    builder: str = "examples.custom_node:PatchMLPBuilder"
    """Builder of this node."""

    image_size: PositiveInt = 16
    """Height and width of the input images, in pixels."""

    patch_size: PositiveInt = 4
    """Side of one square patch; must divide image_size."""

    channels: PositiveInt = 3
    """Colour channels of the input images."""

    hidden_size: PositiveInt = Field(64, description="Features of each output token (the backbone's width).")

    mlp_ratio: PositiveInt = 2
    """Width of the MLP's hidden layer, as a multiple of hidden_size."""

    def model_post_init(self, __context) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchMLPBuilder(ModelBuilder):
    """Images [B, C, H, W] -> patch embeddings [B, num_patches, hidden_size]."""

    config_class = PatchMLPConfig

    def ports(self) -> Ports:
        cfg = self.config
        return Ports.of(
            inputs=[Port("pixel_values", ("batch", "channels", "height", "width"), cfg.image_size,
                         shape=(None, cfg.channels, cfg.image_size, cfg.image_size), doc="images [B, C, H, W]")],
            outputs=[Port("embeddings", ("batch", "tokens", "hidden"), cfg.hidden_size,
                          doc="one token per patch")],
        )

    def output_tokens(self, input_tokens: dict[str, int]) -> dict[str, int]:
        return {"embeddings": self.config.num_patches}  # fixed by the config, whatever the input

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> torch.nn.Module:
        cfg = self.config
        return PatchMLP(cfg.channels, cfg.patch_size, cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio)

    # run(): the default calls model(pixel_values) -> {"embeddings": ...} (one input, one output)

    def synthetic_inputs(self, batch_size, generator, tokens):
        cfg = self.config
        shape = (batch_size, cfg.channels, cfg.image_size, cfg.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}


class PatchMLP(torch.nn.Module):
    """Non-overlapping patches, each flattened and passed through Linear-GELU-Linear."""

    def __init__(self, channels: int, patch_size: int, hidden_size: int, mlp_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels * patch_size * patch_size, mlp_size),
            torch.nn.GELU(),
            torch.nn.Linear(mlp_size, hidden_size),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = torch.nn.functional.unfold(pixel_values, kernel_size=p, stride=p)  # [B, C*p*p, N]
        return self.mlp(patches.transpose(1, 2))
