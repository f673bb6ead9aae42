"""The vision node's 'radio' layout: MCore's RADIOViTModel, run on images of any size.

MCore builds every part (the column-parallel patch embedder, the position table of the largest
image, the class and register tokens, the transformer block, the optional final norm); this
module only runs it: MCore's own forward takes the configured size alone (other sizes need its
packed dynamic-resolution path), so :meth:`RadioViT.forward` embeds, positions and encodes a
batch of one size itself, with MCore's cropped position embeddings (CPE) in their evaluation
form in training too: the training-time random crops of RADIO's pretraining would make a step
depend on the random stream, which no placement parity survives. Then the class and register
tokens are dropped and, with ``pixel_shuffle`` s, each s x s block of patches becomes one token
(Nemotron-Omni's order: the block's rows, then its columns, then the features). A tubelet of T
video frames stacked along the channels runs the same way through the video projection
(``video_patch_frames``), as Nemotron-Omni's video path; a call that does not use one of the two
projections adds it times zero, so each gets a gradient in every step (DDP waits for all).
"""

from __future__ import annotations

import torch
from megatron.core.models.vision.radio import RADIOViTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear


class RadioViT(RADIOViTModel):
    """MCore's RADIOViTModel for images [B, 3, H, W] of any size (multiples of the patch, up to
    the largest image) -> patch features [B, patches / s^2, hidden * s^2]."""

    def __init__(self, *args, pixel_shuffle: int = 1, video_patch_frames: int | None = None, **kwargs):
        super().__init__(*args, force_cpe_eval_mode=True, **kwargs)
        self.pixel_shuffle = pixel_shuffle
        self.output_width = self.visual_hidden_size * pixel_shuffle ** 2
        self.video_embedder = self._video_embedder(video_patch_frames) if video_patch_frames else None

    def _video_embedder(self, frames: int) -> ColumnParallelLinear:
        """RADIO's video patch projection: patches of tubelets (``frames`` frames stacked along
        the channels), as MCore builds its image embedder."""
        return ColumnParallelLinear(frames * 3 * self.patch_dim ** 2, self.visual_hidden_size, bias=False,
                                    config=self.config, init_method=self.config.init_method,
                                    gather_output=True, disable_grad_reduce=True, tp_group=self.tp_group)

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Patch features of images ``x`` [B, 3, H, W] (or tubelets [B, 3T, H, W] through the video
        projection): [B, (H/p)(W/p) / s^2, hidden * s^2]."""
        batch, channels, height, width = x.shape
        p = self.patch_dim
        rows, cols = height // p, width // p
        patches = x.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        used, unused = self._embedders(channels)
        tokens, _ = used(patches.reshape(batch, rows * cols, channels * p * p))
        tokens = tokens + self.get_pos_enc(batch, input_size=(height, width))
        if unused is not None:  # a zero gradient for the other projection: every parameter takes part
            tokens = tokens + 0.0 * unused.weight.sum()
        if self.add_class_token:
            tokens = torch.cat([self.class_token.expand(batch, -1, -1), tokens], dim=1)
        out = self.decoder(tokens.transpose(0, 1).contiguous(), attention_mask=attention_mask).transpose(0, 1)
        out = out[:, self.class_token_len if self.add_class_token else 0:]
        if self.ln_post is not None:
            out = self.ln_post(out)
        return shuffled(out, rows, cols, self.pixel_shuffle)


    def _embedders(self, channels: int):
        """(the projection for inputs of ``channels`` channels, the other one or None)."""
        if self.video_embedder is not None and channels != 3:
            return self.video_embedder, self.embedder
        return self.embedder, self.video_embedder


def shuffled(features: torch.Tensor, rows: int, cols: int, s: int) -> torch.Tensor:
    """Nemotron-Omni's pixel shuffle of [B, rows * cols, C] patch features: token (i, j) of the
    [B, rows/s * cols/s, s * s * C] result holds patches (s*i + r, s*j + c) for r, then c, < s."""
    if s == 1:
        return features.contiguous()
    batch, _, width = features.shape
    grid = features.reshape(batch, rows // s, s, cols // s, s, width).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(batch, (rows // s) * (cols // s), s * s * width)
