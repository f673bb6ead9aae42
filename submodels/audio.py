"""Audio: a Whisper-like encoder, conv subsampling + MCore TransformerBlock (bidirectional)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.runtime.items import encode_input
from submodels import log_mel
from submodels.sdpa_attention import with_core_attention
from mimo_builder._internal.kinds.transformer import TRANSFORMER_LINEARS, make_transformer_config, use_te
from submodels.hf_whisper import sinusoids, whisper_encoder_mapping  # noqa: F401 (sinusoids: public here too)
from submodels.audio_config import AudioConfig  # noqa: F401 (the kind's config, public here too)


class AudioBuilder(ModelBuilder):
    """Builds an :class:`AudioEncoder` whose layers are MCore's GPT layer spec made bidirectional."""

    config_class = AudioConfig

    def linear_layers(self) -> frozenset[str]:
        """Each layer's attention (linear_qkv, linear_proj) and MLP (linear_fc1, linear_fc2) linears."""
        return TRANSFORMER_LINEARS

    def ports(self) -> Ports:
        """Input ``features`` (log-mel, in the configured axis order); output ``embeddings`` [B, tokens, hidden]."""
        cfg = self.config
        features = Port("features", ("batch", "frames", "mels"), cfg.n_mels, doc="log-mel spectrogram")
        if cfg.features_layout == "mels_frames":
            features = Port("features", ("batch", "mels", "frames"), cfg.max_frames,
                            shape=(None, cfg.n_mels, cfg.max_frames), doc="log-mel spectrogram [B, n_mels, max_frames] (Whisper's layout)")
        return Ports.of(
            inputs=[features],
            outputs=[Port("embeddings", ("batch", "tokens", "hidden"), cfg.hidden_size,
                          doc="tokens = ceil(frames / 2)")],
        )

    def output_tokens(self, input_tokens):
        """``embeddings`` carries ceil(frames / 2) tokens (the stride-2 conv)."""
        return {"embeddings": math.ceil(self._frames(input_tokens) / 2)}

    @property
    def ragged_inputs(self) -> frozenset[str]:
        """``features`` takes a list of clips per sample in the frames-first layout."""
        return frozenset({"features"}) if self.config.features_layout == "frames_mels" else frozenset()

    def item_tokens(self, port, shape):
        """One clip [frames, n_mels]: ceil(frames / 2) tokens; 1 to ``max_frames`` frames."""
        frames, mels = shape
        cfg = self.config
        if mels != cfg.n_mels or not 0 < frames <= cfg.max_frames:
            raise ValueError(f"a clip of {frames} frames x {mels} mels: the encoder takes 1 to {cfg.max_frames} "
                             f"frames (max_frames) of {cfg.n_mels} mels")
        return {"embeddings": math.ceil(frames / 2)}

    def run(self, model, inputs):
        """``embeddings`` of ``features``: a stacked batch, or Items (clips of one length together)."""
        return {"embeddings": encode_input(inputs["features"], model, model)}

    def _frames(self, input_tokens) -> int:
        """Input frames: the axis after the batch, or max_frames in Whisper's layout."""
        if self.config.features_layout == "mels_frames":
            return self.config.max_frames
        return input_tokens.get("features", self.config.max_frames)

    def features_from_waveform(self, waveform, sample_rate):
        """Whisper's log-mel of a mono clip (:func:`submodels.log_mel.whisper_log_mel`, after
        resampling to 16 kHz): [frames, n_mels] with ``frames = samples // 160``, or, in Whisper's
        layout, [n_mels, max_frames] of the clip padded with silence; a ValueError beyond max_frames."""
        cfg = self.config
        clip = log_mel.resample(waveform, sample_rate, log_mel.SAMPLE_RATE)
        if cfg.features_layout == "mels_frames":
            return log_mel.whisper_log_mel(clip, cfg.n_mels, pad_to=cfg.max_frames)
        features = log_mel.whisper_log_mel(clip, cfg.n_mels).T.contiguous()
        self.item_tokens("features", tuple(features.shape))  # a ValueError beyond max_frames
        return features

    def synthetic_inputs(self, batch_size, generator, tokens):
        """Log-mel-like features for ``max_frames`` frames."""
        cfg = self.config
        shape = (cfg.n_mels, cfg.max_frames) if cfg.features_layout == "mels_frames" else (cfg.max_frames, cfg.n_mels)
        return {"features": torch.randn((batch_size, *shape), generator=generator)}

    def planned_tokens(self, tokens):
        """The transformer's tokens per sample: ceil(frames / 2)."""
        return math.ceil(self._frames(tokens) / 2)

    def stage_costs(self, config, micro_batch, tokens):
        """Clips of ``max_frames`` frames: the two convolutions (inputs and GELU inputs, replicated
        on every TP rank), bidirectional transformer layers over ``ceil(frames / 2)`` tokens and
        the final norm; one stage."""
        cfg = self.config
        frames, h = self._frames(tokens), cfg.hidden_size
        shape = costs.Shape.of(config, micro_batch, self.planned_tokens(tokens))
        te = costs.builds_te(cfg.impl)
        layer = costs.transformer_layer_cost(shape, config, te, causal=False, flash=costs.flash_attention(cfg.impl))
        per_frame = cfg.n_mels + 2 * h  # conv1 input; GELU input and output at full frame rate
        conv = micro_batch * shape.element * (frames * per_frame + shape.tokens * h)
        conv_flops = 2 * micro_batch * 3 * h * (frames * cfg.n_mels + shape.tokens * h)
        extra = conv + costs.norm_cost(shape, config, te, with_output=False)  # + the final norm
        return [costs.stage_cost(config, [layer] * cfg.num_layers, extra, conv_flops)]

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The common transformer config for ``pg_collection``, unchanged (GELU, biases, LayerNorm)."""
        return make_transformer_config(self.config, pg_collection)  # GELU, biases, LayerNorm: as Whisper

    def hf_mapping(self):
        """Hugging Face Whisper encoder weights (:mod:`submodels.hf_whisper`)."""
        return whisper_encoder_mapping(self.config)

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> "AudioEncoder":
        """The :class:`AudioEncoder` on ``pg_collection``; a ConfigError when its pipeline group has pp > 1."""
        cfg = self.config
        problems = cfg.pp_problems(pg_collection.pp.size())
        if problems:
            raise ConfigError(f"{type(cfg).__name__}: {problems[0]}")
        return AudioEncoder(
            self.transformer_config(pg_collection),
            bidirectional_layer_spec(use_te(cfg.impl), cfg.impl),
            n_mels=cfg.n_mels,
            max_tokens=cfg.max_tokens,
            learned_positions=cfg.position_embedding_type == "learned",
            mels_first=cfg.features_layout == "mels_frames",
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )


def bidirectional_layer_spec(te: bool, impl: str = "local") -> ModuleSpec:
    """MCore's GPT layer spec (TE or local, with ``impl``'s core attention) with self-attention
    unmasked instead of causal."""
    from megatron.core.models.gpt import gpt_layer_specs

    if te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = with_core_attention(gpt_layer_specs.get_gpt_layer_local_spec(), impl)
    attention = spec.submodules.self_attention  # a fresh spec per call: safe to change
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return spec


class AudioEncoder(MegatronModule):
    """Log-mel [B, T, n_mels] ([B, n_mels, T] when ``mels_first``) -> Conv1d+GELU, Conv1d(stride 2)
    +GELU -> + positions -> MCore TransformerBlock with final norm -> [B, ceil(T/2), hidden].

    The convolutions and the position table are plain torch, replicated on every TP rank.
    """

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, *, n_mels: int, max_tokens: int,
                 learned_positions: bool, pg_collection: ProcessGroupCollection, vp_stage: int | None = None,
                 mels_first: bool = False):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp  # MegatronModule's sharded_state_dict marks replicas by it
        self.mels_first = mels_first
        hidden, dtype = config.hidden_size, config.params_dtype
        self.max_tokens = max_tokens
        self.conv1 = torch.nn.Conv1d(n_mels, hidden, kernel_size=3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(hidden, hidden, kernel_size=3, stride=2, padding=1, dtype=dtype)
        self.position_embeddings = torch.nn.Embedding(max_tokens, hidden, dtype=dtype) if learned_positions else None
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=True,
                                        pg_collection=pg_collection, vp_stage=vp_stage)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Pass MCore's pipeline input tensor on to the transformer block."""
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, ceil(T/2), hidden] of log-mel ``features``; a ValueError beyond ``max_tokens``."""
        x = F.gelu(self.conv1(features if self.mels_first else features.transpose(1, 2)))  # [B, H, T]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T', H]
        tokens = x.shape[1]
        if tokens > self.max_tokens:
            raise ValueError(f"{features.shape[1 + self.mels_first]} frames give {tokens} tokens, more than max_frames allows "
                             f"({self.max_tokens}); raise max_frames")
        x = x + self._positions(tokens, x)
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask=None)  # MCore wants [S, B, H]
        return x.transpose(0, 1).contiguous()

    def _positions(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        if self.position_embeddings is not None:
            return self.position_embeddings.weight[:tokens]
        return sinusoids(tokens, like.shape[-1], like.device).to(like.dtype)
