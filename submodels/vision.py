"""Vision: a ViT image encoder on MCore's CLIPViTModel (conv patch embedding + TransformerBlock)."""

from __future__ import annotations


import torch
from megatron.core.activations import quick_gelu
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.runtime.items import encode_input
from submodels.sdpa_attention import with_core_attention
from mimo_builder._internal.kinds.transformer import TRANSFORMER_LINEARS, make_transformer_config, use_te
from submodels.vision_config import VisionConfig  # noqa: F401 (the kind's config, public here too)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's; transformers' ``gelu_pytorch_tanh``)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": torch.nn.functional.gelu, "gelu_tanh": gelu_tanh}


# The local ViT layer's separate norms, under the names of the TE layer's fused norms (the map
# MCore's local GPT layer spec applies; its ViT local spec omits it).
FUSED_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class VisionBuilder(ModelBuilder):
    """Builds MCore's CLIPViTModel with the ViT layer spec (Transformer Engine or local)."""

    config_class = VisionConfig

    def param_inits(self):
        """Layout 'radio': the patch embedder, normal with std 1 as MCore's RADIO draws it."""
        if self.config.layout != "radio":
            return {}
        from submodels.radio import RadioViT

        return {(RadioViT, "embedder.weight"): lambda module, full: torch.nn.init.normal_(full, 0.0, 1.0)}

    def linear_layers(self) -> frozenset[str]:
        """Each layer's attention (linear_qkv, linear_proj) and MLP (linear_fc1, linear_fc2) linears."""
        return TRANSFORMER_LINEARS

    def ports(self) -> Ports:
        """Input ``pixel_values`` [B, C, H, W]; output ``embeddings`` [B, patches (+ class token), hidden]."""
        return Ports.of(
            inputs=[Port("pixel_values", ("batch", "channels", "height", "width"), self.config.image_size,
                         doc="images [B, C, H, W]; the last axis is the width",
                         shape=(None, self.config.num_channels, self.config.image_size, self.config.image_size))],
            outputs=[Port("embeddings", ("batch", "patches", "hidden"), self.config.output_width)],
        )

    def output_tokens(self, input_tokens):
        """``embeddings`` carries the config's ``num_tokens``, whatever the input."""
        return {"embeddings": self.config.num_tokens}

    ragged_inputs = frozenset({"pixel_values"})

    def item_tokens(self, port, shape):
        """One image [C, H, W]: (H / patch) x (W / patch) patches (+ the class token); H and W
        multiples of the patch up to ``largest_image``, C the configured channels (or, with
        ``video_patch_frames``, a tubelet's: as many tokens as an image)."""
        channels, height, width = shape
        cfg = self.config
        tubelet = cfg.num_channels * (cfg.video_patch_frames or 1)
        if channels not in (cfg.num_channels, tubelet):
            also = f" (or {tubelet}: a tubelet of {cfg.video_patch_frames} frames)" if tubelet != cfg.num_channels else ""
            raise ValueError(f"an image of {channels} channels; the tower takes {cfg.num_channels}{also}")
        return {"embeddings": cfg.image_tokens(height, width)}

    def video_items(self, port, frames):
        """With ``video_patch_frames`` T: the video's tubelets, T frames each stacked along the
        channels (the last frame repeated to fill the last), as Nemotron-Omni packs them;
        else its frames one by one."""
        count = self.config.video_patch_frames
        if not count:
            return list(frames)
        short = -len(frames) % count
        if short:
            frames = torch.cat([frames, frames[-1:].expand(short, *frames.shape[1:])])
        return list(frames.reshape(len(frames) // count, count * frames.shape[1], *frames.shape[2:]))

    def run(self, model, inputs):
        """``embeddings`` of ``pixel_values``: a stacked batch, or Items (a list of images per
        sample, images of one size through the tower together; :func:`encode_input`)."""
        images, first = inputs["pixel_values"], self.config.dropped_tokens

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return model(pixels)[:, first:] if first else model(pixels)

        return {"embeddings": encode_input(images, encode, model, width=self.config.output_width)}

    def synthetic_inputs(self, batch_size, generator, tokens):
        """Random normal ``pixel_values`` of the configured channels and image size."""
        cfg = self.config
        shape = (batch_size, cfg.num_channels, cfg.image_size, cfg.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def planned_tokens(self, tokens):
        """Tokens per image: the patches plus the class token if any."""
        return self.config.num_tokens

    def stage_costs(self, config, micro_batch, tokens):
        """Bidirectional transformer layers over the patches (+ class token), plus the patch
        convolution's input (the images) and the pre-norm's input (CLIP layout); one stage."""
        cfg = self.config
        shape = costs.Shape.of(config, micro_batch, cfg.num_patches + cfg.prefix_tokens)
        te = costs.builds_te(cfg.impl)
        layer = costs.transformer_layer_cost(shape, config, te, causal=False, flash=costs.flash_attention(cfg.impl))
        pixels = micro_batch * cfg.num_channels * cfg.image_size ** 2 * shape.element
        conv_flops = 2 * micro_batch * cfg.num_patches * cfg.num_channels * cfg.patch_size ** 2 * cfg.hidden_size
        ln_pre = costs.norm_cost(shape, config, te, with_output=False) if cfg.layout == "clip" else 0
        extra = pixels + ln_pre
        return [costs.stage_cost(config, [layer] * cfg.built_layers, extra, conv_flops)]

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The transformer config with the configured activation and only the built layers."""
        cfg = self.config
        # MCore's defaults are CLIP's otherwise: biases on every linear, LayerNorm eps 1e-5.
        return make_transformer_config(cfg, pg_collection, activation_func=ACTIVATIONS[cfg.activation],
                                       num_layers=cfg.built_layers)

    def hf_mapping(self):
        """Hugging Face vision tower weights of the config's ``layout``: CLIP's
        (:mod:`submodels.hf_clip`), SigLIP's (:mod:`submodels.hf_siglip`) or RADIO's
        (:mod:`submodels.hf_radio`)."""
        if self.config.layout == "radio":
            from submodels.hf_radio import radio_mapping

            return radio_mapping(self.config)
        if self.config.layout == "siglip":
            from submodels.hf_siglip import siglip_vision_mapping

            return siglip_vision_mapping(self.config)
        from submodels.hf_clip import clip_vision_mapping

        return clip_vision_mapping(self.config)

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        """The :class:`ViTModel` (or, layout 'radio', :class:`~submodels.radio.RadioViT`) on
        ``pg_collection`` (:meth:`vit_model_kwargs`)."""
        return self._model_class()(**self.vit_model_kwargs(pg_collection, vp_stage))

    def _model_class(self) -> type:
        if self.config.layout == "radio":
            from submodels.radio import RadioViT

            return RadioViT
        return ViTModel

    mimo_roles = frozenset({"encoder"})
    mimo_encoder_keywords = {"pixel_values": "x"}

    def mimo_problems(self, role: str) -> list[str]:
        """The base role check, plus a refusal of ``feature_select: default`` (MIMO's encoder
        returns the tower's every output token)."""
        problems = super().mimo_problems(role)
        if self.config.dropped_tokens:
            problems.append("feature_select 'default' cannot be exported to MIMO: MIMO takes the tower's every "
                            "output token, and the node drops its first; use feature_select 'full'")
        return problems

    def mimo_spec(self, role, pg_collection) -> ModuleSpec:
        """As a MIMO encoder: the same ViTModel (forward ``x`` [B, C, H, W] -> [B, N, H])."""
        self.check_mimo_role(role)
        return ModuleSpec(module=self._model_class(), params=self.vit_model_kwargs(pg_collection))

    def vit_model_kwargs(self, pg_collection, vp_stage=None) -> dict:
        """The keyword arguments of :class:`ViTModel` on ``pg_collection``."""
        from megatron.core.models.vision import vit_layer_specs

        cfg = self.config
        problems = cfg.pp_problems(pg_collection.pp.size())
        if problems:
            raise ConfigError(f"{type(cfg).__name__}: {problems[0]}")
        if use_te(cfg.impl):
            from megatron.core.extensions.transformer_engine import TENorm

            spec, norm = vit_layer_specs.get_vit_layer_with_transformer_engine_spec(), TENorm
        else:
            spec = with_core_attention(vit_layer_specs.get_vit_layer_with_local_spec(), cfg.impl)
            norm = vit_layer_specs.LNImpl
            spec.submodules.sharded_state_dict_keys_map = dict(FUSED_NORM_KEYS)  # checkpoint keys as TE names them
        if cfg.layout == "radio":
            return self._radio_kwargs(pg_collection, vp_stage, spec, norm)
        return dict(
            transformer_config=self.transformer_config(pg_collection),
            transformer_layer_spec=spec,
            ln_pre_impl=norm,
            ln_post_impl=norm,  # MCore builds a SigLIP's; ViTModel keeps it only with ln_post
            ln_post=cfg.ln_post,
            model_subtype=cfg.layout,
            add_class_token=cfg.class_token,
            class_token_len=int(cfg.class_token),  # MCore's SigLIP asserts 0
            patch_dim=cfg.patch_size,
            img_h=cfg.grid_pixels,
            img_w=cfg.grid_pixels,
            num_channels=cfg.num_channels,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )


    def _radio_kwargs(self, pg_collection, vp_stage, spec, norm) -> dict:
        """:class:`~submodels.radio.RadioViT`'s keyword arguments (MCore's RADIOViTModel's)."""
        cfg = self.config
        return dict(
            transformer_config=self.transformer_config(pg_collection), transformer_layer_spec=spec,
            ln_post_impl=norm if cfg.ln_post else None, add_class_token=cfg.prefix_tokens > 0,
            class_token_len=cfg.prefix_tokens, patch_dim=cfg.patch_size, img_h=cfg.image_size, img_w=cfg.image_size,
            max_img_h=cfg.largest_image, max_img_w=cfg.largest_image, pixel_shuffle=cfg.pixel_shuffle,
            video_patch_frames=cfg.video_patch_frames, pg_collection=pg_collection, vp_stage=vp_stage)


class ViTModel(CLIPViTModel):
    """MCore's CLIPViTModel with any number of input channels and device-following position ids.

    CLIPViTModel hard-codes 3 input channels and keeps its position ids in a plain tensor moved
    with ``.cuda()`` at construction, which stays on the meta device after meta init; here they
    are made on the fly on the device of the position embedding. It also keeps its TP group,
    which MCore's sharded state dict reads (else from the global parallel state, which the
    project does not set). Forward: [B, C, H, W] -> [B, N, H].
    """

    def __init__(self, *args, num_channels: int = 3, ln_post: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # post_layernorm over every token when asked (MCore builds it for every SigLIP, never for CLIP)
        config, norm = self.config, kwargs.get("ln_post_impl", kwargs.get("ln_pre_impl"))
        self.ln_post = build_module(norm, config=config, hidden_size=config.hidden_size,
                                    eps=config.layernorm_epsilon) if ln_post else None
        self.tp_group = self.pg_collection.tp
        if num_channels != self.conv1.in_channels:
            self.conv1 = torch.nn.Conv2d(num_channels, self.visual_hidden_size, kernel_size=self.patch_dim,
                                         stride=self.patch_dim, bias=self.conv1.bias is not None)

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """[B, N, H] embeddings of [B, C, h, w] images: the configured size as MCore's model runs
        it, another grid with the position table interpolated (bicubic, as CLIP's
        ``interpolate_pos_encoding``)."""
        grid = (x.shape[-2] // self.patch_dim, x.shape[-1] // self.patch_dim)
        if grid == (self.img_h // self.patch_dim, self.img_w // self.patch_dim):
            return super().forward(x, attention_mask)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid cells, hidden]
        if self.add_class_token:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.grid_positions(*grid)
        if self.ln_pre:
            x = self.ln_pre(x)
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask).transpose(0, 1).contiguous()
        return self.ln_post(x) if self.ln_post else x

    def grid_positions(self, rows: int, cols: int) -> torch.Tensor:
        """[class token +] rows x cols position embeddings, the configured grid's table resized."""
        table = self.position_embeddings.weight
        first = self.class_token_len if self.add_class_token else 0
        side = (self.img_h // self.patch_dim, self.img_w // self.patch_dim)
        grid = table[first:].reshape(1, *side, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([table[:first], grid.to(table.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)])

    @property
    def position_ids(self) -> torch.Tensor:
        """[1, seq_length] positions 0..seq_length-1, on the position embedding's device."""
        return torch.arange(self.seq_length, device=self.position_embeddings.weight.device).unsqueeze(0)

    @position_ids.setter
    def position_ids(self, value) -> None:
        """Ignore the assigned value: the getter computes the ids."""
        pass  # CLIPViTModel.__init__ assigns a fixed tensor; the getter builds it where needed


# --- presets: real published shapes ---------------------------------------------------------

def vit_l14_config(**overrides) -> VisionConfig:
    """CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14): 224 px, 24 x 1024, 16 heads."""
    return VisionConfig(**{**dict(
        image_size=224, patch_size=14, num_layers=24, hidden_size=1024, num_attention_heads=16,
        ffn_hidden_size=4096, class_token=True, activation="quick_gelu"), **overrides})
