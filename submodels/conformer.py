"""Conformer: a FastConformer audio encoder (NVIDIA Parakeet) on Megatron-Core's tensor-parallel
linears; the module is :mod:`submodels.conformer_layers`, the Hugging Face mapping
:mod:`submodels.hf_parakeet`."""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.kinds.transformer import TRANSFORMER_LINEARS, make_transformer_config
from mimo_builder._internal.runtime.items import encode_input
from submodels import log_mel
from submodels.conformer_config import ConformerConfig
from submodels.conformer_layers import ConformerEncoder, RelPositionAttention
from submodels.hf_parakeet import parakeet_encoder_mapping, section_of


def _normal_head_rows(module: RelPositionAttention, full: torch.Tensor) -> None:
    torch.nn.init.normal_(full, std=module.config.init_method_std)


class ConformerBuilder(ModelBuilder):
    """Builds a :class:`~submodels.conformer_layers.ConformerEncoder` (one pipeline stage)."""

    config_class = ConformerConfig

    def linear_layers(self) -> frozenset[str]:
        """Each layer's Megatron-Core linears: linear_qkv, linear_pos, linear_proj (attention) and
        linear_fc1, linear_fc2 (both feed-forwards)."""
        return TRANSFORMER_LINEARS | {"linear_pos"}

    def param_inits(self):
        """The per-head biases ``bias_u`` and ``bias_v``: normal with ``init_method_std``, drawn whole."""
        return {(RelPositionAttention, name): _normal_head_rows for name in ("bias_u", "bias_v")}

    def ports(self) -> Ports:
        """Input ``features`` [B, frames, n_mels] (log-mel); output ``embeddings`` [B, tokens, hidden]."""
        cfg = self.config
        return Ports.of(
            inputs=[Port("features", ("batch", "frames", "mels"), cfg.n_mels, doc="log-mel spectrogram")],
            outputs=[Port("embeddings", ("batch", "tokens", "hidden"), cfg.hidden_size,
                          doc=f"tokens = frames subsampled {cfg.subsampling_factor}x (clip_tokens)")],
        )

    def output_tokens(self, input_tokens):
        """``embeddings`` carries the subsampled frame count (``ConformerConfig.subsampled``)."""
        return {"embeddings": self.config.subsampled(self._frames(input_tokens))}

    ragged_inputs = frozenset({"features"})

    def item_tokens(self, port, shape):
        """One clip [frames, n_mels]: its subsampled frame count; 1 to ``max_frames`` frames of ``n_mels`` mels."""
        frames, mels = shape
        cfg = self.config
        if mels != cfg.n_mels:
            raise ValueError(f"a clip of {frames} frames x {mels} mels: the encoder takes {cfg.n_mels} mels "
                             f"(n_mels), {cfg.min_frames} to {cfg.max_frames} frames (max_frames)")
        return {"embeddings": cfg.clip_tokens(frames)}

    def run(self, model, inputs):
        """``embeddings`` of ``features``: a stacked batch, or Items (clips of one length together)."""
        return {"embeddings": encode_input(inputs["features"], model, model)}

    def _frames(self, input_tokens) -> int:
        return input_tokens.get("features", self.config.max_frames)

    def features_from_waveform(self, waveform, sample_rate):
        """Parakeet's normalised log-mel [frames, n_mels] of a mono clip
        (:func:`submodels.log_mel.parakeet_log_mel`, after resampling to 16 kHz), ``frames =
        samples // 160``; a ValueError outside min_frames..max_frames."""
        clip = log_mel.resample(waveform, sample_rate, log_mel.SAMPLE_RATE)
        features = log_mel.parakeet_log_mel(clip, self.config.n_mels)
        self.config.clip_tokens(features.shape[0])  # a ValueError outside the frames the encoder takes
        return features

    def synthetic_inputs(self, batch_size, generator, tokens):
        """Log-mel-like features of ``max_frames`` frames."""
        cfg = self.config
        return {"features": torch.randn((batch_size, cfg.max_frames, cfg.n_mels), generator=generator)}

    def planned_tokens(self, tokens):
        """Tokens per sample the layers run on: the subsampled frames."""
        return self.config.subsampled(self._frames(tokens))

    def stage_costs(self, config, micro_batch, tokens):
        """Clips of ``max_frames`` frames (or the arriving count): the subsampling convolutions
        (replicated on every TP rank), and per layer an attention + feed-forward layer (unfused
        attention: the positional scores make a float mask), the position scores, the second
        feed-forward, the convolution module and two more LayerNorms; one stage."""
        shape = costs.Shape.of(config, micro_batch, self.planned_tokens(tokens))
        layer = self._layer_cost(shape, config)
        sub_bytes, sub_flops = self._subsampling_cost(micro_batch, self._frames(tokens), shape.element)
        return [costs.stage_cost(config, [layer] * self.config.num_layers, sub_bytes, sub_flops)]

    def _layer_cost(self, shape: costs.Shape, config: TransformerConfig) -> costs.LayerCost:
        cfg, te = self.config, False  # the node builds MCore's local linears only
        h, t = cfg.hidden_size, shape.tokens
        base = costs.transformer_layer_cost(shape, config, te, causal=False, flash=False)
        ff2 = costs.mlp_cost(shape, config, te)
        scores = shape.batch * cfg.num_attention_heads * shape.local_tokens * (3 * t) / shape.tp
        positional = int(scores * shape.element)  # the [T, 2T-1] position scores, shifted, and the [T, T] mask
        conv = shape.replicated(6 * h)  # GLU input (2h) and output, depthwise, BatchNorm and SiLU outputs
        norms = 2 * costs.norm_cost(shape, config, te)  # the convolution module's and the output's
        flops = (shape.matmul_flops(3 * h * h + cfg.conv_kernel_size * h)  # pointwise convs, depthwise
                 + 2 * shape.batch * t * (2 * t) * h  # (q + bias_v) p^T
                 + 2 * (2 * t) * h * h)  # the position projection, once per microbatch
        saved = base.saved + ff2.saved + positional + conv + norms
        return costs.LayerCost(saved, base.flops + ff2.flops + flops, base.input, base.recomputed)

    def _subsampling_cost(self, micro_batch: int, frames: int, element: int) -> tuple[int, int]:
        """(bytes kept, FLOPs) of the subsampling: the features, per strided step the outputs of
        its convolutions and ReLU, and the final linear's FLOPs."""
        cfg = self.config
        c, k = cfg.subsampling_channels, cfg.subsampling_kernel_size
        kept, flops, t, f = frames * cfg.n_mels, 0, frames, cfg.n_mels
        for step in range(cfg.subsampling_layers):
            t, f = (cfg.subsampled_once(n) for n in (t, f))
            kept += (2 if step == 0 else 3) * c * t * f
            flops += 2 * c * t * f * (k * k + (c if step else 0))  # strided (depthwise) conv, pointwise conv
        flops += 2 * t * c * f * cfg.hidden_size  # the linear to hidden
        return micro_batch * kept * element, micro_batch * flops

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The common transformer config for ``pg_collection`` (init methods, dtype, LayerNorm eps)."""
        return make_transformer_config(self.config, pg_collection)

    def hf_mapping(self):
        """Hugging Face Parakeet encoder weights (:mod:`submodels.hf_parakeet`)."""
        return parakeet_encoder_mapping(self.config)

    def hf_mapping_for(self, hf_config: dict):
        """The mapping reading a folder whose config.json is ``hf_config``: its fields at the top
        (ParakeetEncoder), under ``encoder_config`` (CTC, RNN-T, TDT) or ``audio_config`` (Omni)."""
        return parakeet_encoder_mapping(self.config, section_of(hf_config))

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> ConformerEncoder:
        """The :class:`ConformerEncoder` on ``pg_collection``; a ConfigError when its pipeline group has pp > 1."""
        cfg = self.config
        problems = cfg.pp_problems(pg_collection.pp.size())
        if problems:
            raise ConfigError(f"{type(cfg).__name__}: {problems[0]}")
        return ConformerEncoder(self.transformer_config(pg_collection), cfg, pg_collection)
