"""GPT: a decoder-only transformer language model on MCore's GPTModel."""

from __future__ import annotations


import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports, token_input_ports
from submodels.sdpa_attention import with_core_attention
from mimo_builder._internal.kinds.transformer import TRANSFORMER_LINEARS, make_transformer_config, padded_vocab_size, use_te
from submodels.gpt_config import GPTConfig  # noqa: F401 (the kind's config, public here too)


class GPTBuilder(ModelBuilder):
    """Builds MCore's GPTModel (Transformer Engine spec when available, else the local spec)."""

    config_class = GPTConfig

    def linear_layers(self) -> frozenset[str]:
        """Each layer's attention (linear_qkv, linear_proj) and MLP (linear_fc1, linear_fc2) linears."""
        return TRANSFORMER_LINEARS

    def ports(self) -> Ports:
        """Token inputs (ids, positions, labels, loss mask); outputs ``logits`` and per-token ``loss``."""
        cfg = self.config
        positions = cfg.seq_length if cfg.position_embedding_type == "learned_absolute" else None  # a table
        return Ports.of(
            inputs=[
                *token_input_ports(cfg.vocab_size, positions),
            ],
            outputs=[
                Port("logits", ("batch", "tokens", "vocab"), cfg.vocab_size),
                Port("loss", ("batch", "tokens")),
            ],
        )

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The common transformer config for ``pg_collection``, with no GPT-specific fields."""
        return make_transformer_config(self.config, pg_collection)

    def run(self, model, inputs):
        """One forward on one stage (pp 1): ``loss`` (mean over ``loss_mask``) when labels are
        given, else ``logits``."""
        ids = inputs["input_ids"]
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        labels = inputs.get("labels")
        out = model(ids, positions, None, labels=labels)
        if labels is None:
            return {"logits": out}
        mask = inputs.get("loss_mask")
        mask = torch.ones_like(out, dtype=torch.float32) if mask is None else mask.float()
        return {"loss": (out.float() * mask).sum() / mask.sum().clamp(min=1.0)}

    def stage_costs(self, config, micro_batch, tokens):
        """Transformer layers split evenly (Korthikanti et al.), the embedding's dropout mask on the
        first stage, final norm, output layer and fp32 cross-entropy softmax on the last."""
        cfg = self.config
        shape = costs.Shape.of(config, micro_batch, self.planned_tokens(tokens))
        te = costs.builds_te(cfg.impl)
        layer = costs.transformer_layer_cost(shape, config, te, rope=cfg.position_embedding_type == "rope",
                                             flash=costs.flash_attention(cfg.impl))
        split = costs.even_split(cfg.num_layers, costs.virtual_stage_count(config))
        vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, shape.tp)
        head_bytes, head_flops = costs.output_cost(shape, config, te, vocab)
        embedding_mask = shape.replicated(cfg.hidden_size, 1) if cfg.hidden_dropout > 0 else 0
        last = len(split) - 1
        return [costs.stage_cost(config, [layer] * count,
                                 (embedding_mask if k == 0 else 0) + (head_bytes if k == last else 0),
                                 head_flops if k == last else 0)
                for k, count in enumerate(split)]

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> GPTModel:
        """MCore's GPTModel for one (virtual) stage, vocabulary padded for TP; None flags mean True."""
        from megatron.core.models.gpt import gpt_layer_specs

        cfg = self.config
        config = self.transformer_config(pg_collection)
        if use_te(cfg.impl):
            spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        else:
            spec = with_core_attention(gpt_layer_specs.get_gpt_layer_local_spec(), cfg.impl)
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, pg_collection.tp.size()),
            max_sequence_length=cfg.seq_length,
            pre_process=True if pre_process is None else pre_process,
            post_process=True if post_process is None else post_process,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
