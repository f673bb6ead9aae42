"""Projector: maps encoder features to a language model's width on MCore's MultimodalProjector.

Optionally merges groups of ``token_reduction`` consecutive tokens (features concatenated)
before projecting, so an encoder's N tokens become N / token_reduction tokens.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.transformer import make_transformer_config, use_te
from submodels.projector_config import ProjectorConfig  # noqa: F401 (the kind's config, public here too)

def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU squared (Nemotron's ``relu2``)."""
    return F.relu(x).square()


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "relu2": squared_relu}


class ProjectorBuilder(ModelBuilder):
    """Builds MCore's MultimodalProjector (column- then row-parallel linears) with token merging."""

    config_class = ProjectorConfig

    def linear_layers(self) -> frozenset[str]:
        """The MLP's linear_fc1 and linear_fc2, or the affine projector's one linear (``encoder``)."""
        return frozenset({"encoder"} if self.config.projector_type == "affine" else {"linear_fc1", "linear_fc2"})

    def ports(self) -> Ports:
        """Input ``input`` [B, tokens, input_size]; output ``output`` [B, tokens / token_reduction, output_size]."""
        cfg = self.config
        return Ports.of(
            inputs=[Port("input", ("batch", "tokens", "features"), cfg.input_size)],
            outputs=[Port("output", ("batch", "tokens", "hidden"), cfg.output_size,
                          doc="tokens = input tokens / token_reduction")],
        )

    def output_tokens(self, input_tokens):
        """``output`` carries input tokens / token_reduction; a ConfigError when that does not divide."""
        tokens, r = input_tokens["input"], self.config.token_reduction
        if tokens % r:
            raise ConfigError(f"config.token_reduction {r} does not divide the {tokens} tokens arriving on "
                              "input; choose a token_reduction that divides them")
        return {"output": tokens // r}

    def synthetic_inputs(self, batch_size, generator, tokens):
        """Random normal ``input`` of 16 tokens per sample."""
        return {"input": torch.randn((batch_size, 16, self.config.input_size), generator=generator)}

    def planned_tokens(self, tokens):
        """Input tokens arriving on the edge (16 when the batch binds the input, as synthetic data)."""
        return tokens.get("input", 16)

    def stage_costs(self, config, micro_batch, tokens):
        """'mlp': fc1 input (merged tokens, whole on every TP rank; the norm's input too when it
        has one), the activation's input and output (split over TP); 'affine': the one linear's
        input. One stage."""
        cfg = self.config
        merged = costs.Shape.of(config, micro_batch, self.planned_tokens(tokens) // cfg.token_reduction)
        width = cfg.input_size * cfg.token_reduction
        if cfg.projector_type == "affine":
            return [costs.StageCost(merged.replicated(width), merged.matmul_flops(width * cfg.output_size))]
        saved = merged.replicated(width) * (2 if cfg.norm == "rmsnorm" else 1) + 2 * merged.sharded(cfg.ffn_width)
        return [costs.StageCost(saved, merged.matmul_flops(width * cfg.ffn_width + cfg.ffn_width * cfg.output_size))]

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The transformer config with the projector's hidden width and activation (no gated or fused unit)."""
        cfg = self.config
        return make_transformer_config(
            cfg, pg_collection,
            ffn_hidden_size=cfg.ffn_width,
            num_attention_heads=pg_collection.tp.size(),  # unused; MCore wants heads divisible by TP
            activation_func=ACTIVATIONS[cfg.activation],
            gated_linear_unit=False,
            bias_activation_fusion=False,
        )

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> "Projector":
        """The :class:`Projector` on ``pg_collection`` (one stage: the pipeline flags are ignored)."""
        return Projector(**self.projector_kwargs(pg_collection))

    def hf_mapping(self):
        """The projector of ``hf_format``: LLaVA's (:mod:`submodels.hf_llava`) or Nemotron-Omni's
        (:mod:`submodels.hf_omni`)."""
        if self.config.hf_format != "llava":
            from submodels.hf_omni import omni_projector_mapping

            return omni_projector_mapping(self.config)
        from submodels.hf_llava import llava_projector_mapping

        return llava_projector_mapping(self.config)

    mimo_roles = frozenset({"projection"})

    def mimo_problems(self, role: str) -> list[str]:
        """The base role check, plus a refusal of token_reduction other than 1."""
        problems = super().mimo_problems(role)
        if self.config.token_reduction != 1:
            problems.append(f"token_reduction {self.config.token_reduction} cannot be exported to MIMO: MIMO "
                            "flattens encoder outputs to [tokens, features] before projecting, so groups of "
                            "tokens of one sample cannot be merged; use token_reduction 1")
        return problems

    def mimo_spec(self, role, pg_collection) -> ModuleSpec:
        """As MIMO's input projection: the same Projector, which also takes MIMO's [tokens, F]."""
        self.check_mimo_role(role)
        return ModuleSpec(module=Projector, params=self.projector_kwargs(pg_collection))

    def projector_kwargs(self, pg_collection) -> dict:
        """The keyword arguments of :class:`Projector` on ``pg_collection``."""
        cfg = self.config
        # MCore's affine projector asks its linear for gather_output=True, which TE linears refuse.
        if use_te(cfg.impl) and cfg.projector_type == "mlp":
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

            linears = MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
        else:
            from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

            linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        return dict(config=self.transformer_config(pg_collection), submodules=linears,
                    projector_type=cfg.projector_type, input_size=cfg.input_size,
                    token_reduction=cfg.token_reduction, pg_collection=pg_collection,
                    norm_epsilon=cfg.norm_epsilon if cfg.norm == "rmsnorm" else None)


class Projector(MultimodalProjector):
    """MCore's MultimodalProjector, batch-first, after merging ``token_reduction`` tokens:
    [B, N, F] -> [B, N / token_reduction, F * token_reduction] -> [B, N / token_reduction, out]."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, *, projector_type: str,
                 input_size: int, token_reduction: int, pg_collection: ProcessGroupCollection,
                 norm_epsilon: float | None = None):
        super().__init__(config, submodules, projector_type, input_size * token_reduction,
                         pg_collection=pg_collection)
        self.token_reduction = token_reduction
        # an RMSNorm before the first linear when asked (plain torch: MCore's projector has none)
        self.norm = None if norm_epsilon is None else torch.nn.RMSNorm(
            input_size * token_reduction, eps=norm_epsilon, dtype=config.params_dtype)
        if projector_type == "affine":
            # MultimodalProjector gathers the affine output but adds the bias after, and that bias
            # is this rank's TP shard (wrong shape at TP > 1). Add it inside, before the gather.
            self.encoder.skip_bias_add = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Projected tokens [B, N / token_reduction, out] of [B, N, F]; MIMO's [tokens, F] as is when r = 1."""
        if hidden_states.dim() == 2 and self.token_reduction == 1:  # MIMO's flattened [tokens, F]
            return super().forward(self._normed(hidden_states))
        batch, tokens, features = hidden_states.shape
        r = self.token_reduction
        if tokens % r:  # ragged items' padding (each item's own tokens divide, checked per item)
            hidden_states = F.pad(hidden_states, (0, 0, 0, r - tokens % r))
            tokens += r - tokens % r
        merged = hidden_states.reshape(batch, tokens // r, features * r)
        return super().forward(self._normed(merged))

    def _normed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The input through the RMSNorm, when the projector has one (in fp32, as Nemotron-Omni's)."""
        if self.norm is None:
            return hidden_states
        weight = self.norm.weight
        normed = F.rms_norm(hidden_states.float(), weight.shape, weight.float(), self.norm.eps)
        return normed.to(hidden_states.dtype)
