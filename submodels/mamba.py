"""Mamba / hybrid backbone: MambaConfig + MambaBuilder on MCore's HybridModel.

A ``hybrid_layer_pattern`` names each layer with MCore's symbols (``M`` Mamba-2, ``*``
attention, ``-`` MLP, ``E`` mixture of experts; ``|`` splits pipeline stages). On CPU the
pure-torch kernels of :mod:`submodels.mamba_kernels` stand in for mamba-ssm's Triton kernels,
so MCore's own MambaMixer runs unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from submodels import mamba_cpu, mamba_kernels
from submodels.context_parallel import cp_size, split_for_cp_rank
from submodels.lm_metrics import exact_match, greedy_predictions
from submodels.mamba_costs import hybrid_stage_costs
from submodels.mamba_spec import hybrid_stack_spec
from submodels.sdpa_attention import core_attention

mamba_kernels.ensure_mamba_ssm_importable()  # fails loudly if MCore's mixer loaded without mamba-ssm

from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports, token_input_ports  # noqa: E402
from mimo_builder._internal.platform.compat import resolve_device  # noqa: E402
from mimo_builder._internal.errors import ConfigError  # noqa: E402
from mimo_builder._internal.assembly.tp_shard import unwrap  # noqa: E402
from mimo_builder._internal.kinds.transformer import make_transformer_config, padded_vocab_size, use_te  # noqa: E402
from mimo_builder._internal.runtime.generation import SAMPLE_INDEX, GenerationOptions, prompt_ends  # noqa: E402
from mimo_builder._internal.runtime.packing import LENGTHS_PORT, Packing  # noqa: E402
from mimo_builder._internal.runtime.shards import joined  # noqa: E402
from submodels.mamba_generate import generate  # noqa: E402
from submodels.mamba_init import MAMBA_RULES  # noqa: E402
from submodels.mamba_config import LAYER_SYMBOLS, PIPE, MambaConfig  # noqa: E402,F401 (public here too)

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
               "squared_relu": lambda x: F.relu(x).pow(2)}


def mem_eff_path_available() -> bool:
    """Whether MCore's Mamba training path (``use_mamba_mem_eff_path``, the one that takes packed rows)
    can run: on CPU through the project's kernels, on CUDA when causal-conv1d is installed."""
    if resolve_device().type == "cpu":
        return True
    if importlib.util.find_spec("causal_conv1d") is None:
        return False
    try:  # its CUDA extension, which mamba-ssm's fused kernel calls, must load too
        importlib.import_module("causal_conv1d.cpp_functions")
    except (ImportError, OSError):
        return False
    return True


class MambaBuilder(ModelBuilder):
    """Builds MCore's HybridModel with a Transformer Engine spec when available, else a local one."""

    config_class = MambaConfig

    def param_inits(self):
        """The Mamba mixer's convolution, dt and A, as MCore draws them (:mod:`submodels.mamba_init`)."""
        return dict(MAMBA_RULES)

    def linear_layers(self) -> frozenset[str]:
        """The pattern's Mamba (in_proj, out_proj), attention (linear_qkv, linear_proj) and MLP
        (linear_fc1, linear_fc2) linears; MoE experts are not adapted."""
        symbols = set(self.config.hybrid_layer_pattern)
        names = {"M": ("in_proj", "out_proj"), "*": ("linear_qkv", "linear_proj"), "-": ("linear_fc1", "linear_fc2")}
        return frozenset(n for symbol, pair in names.items() if symbol in symbols for n in pair)

    def ports(self) -> Ports:
        """Token inputs plus one optional embeddings input per modality; outputs logits, loss and correct."""
        cfg = self.config
        positions = cfg.seq_length if cfg.position_embedding_type == "learned_absolute" else None  # a table
        return Ports.of(
            inputs=[
                *token_input_ports(cfg.vocab_size, positions),
                *(Port(name, ("batch", "tokens", "hidden"), self.config.hidden_size, required=False,
                       doc=f"embeddings placed at token id {token}")
                  for name, token in self.config.modality_token_ids.items()),
                Port(LENGTHS_PORT, ("batch",), required=False, dtype="int", high=cfg.seq_length + 1,
                     doc="per sample, its tokens (the rest of its row is padding): a training step packs "
                         "the samples several to a row of seq_length"),
            ],
            outputs=[
                Port("logits", ("batch", "tokens", "vocab"), self.config.vocab_size),
                Port("loss", ("batch", "tokens")),
                Port("correct", ("batch",), doc="in eval mode, 1.0 where greedy decoding writes every label "
                                                "under the loss mask, else 0.0 (GraphSchedule.evaluate)"),
                Port("generated", ("batch", "tokens"), required=False,
                     doc="in eval mode under GraphSchedule.generate, the new tokens after each prompt (the "
                         "input ids up to the first loss-masked position), -1 after a row stopped"),
                Port("free_running", ("batch",), required=False,
                     doc="in eval mode, 1.0 where greedy decoding from the prompt alone, each answer token "
                         "fed back, writes every label under the loss mask (one pipeline stage, cp=1)"),
            ],
        )

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The transformer config with the norm, activation, Mamba sizes and, with experts, the MoE options."""
        cfg = self.config
        moe: dict[str, Any] = {}
        if cfg.num_experts is not None:
            moe = dict(num_moe_experts=cfg.num_experts, moe_router_topk=cfg.moe_router_topk,
                       moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
                       moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall")
        return make_transformer_config(
            cfg, pg_collection,
            normalization=cfg.normalization,
            activation_func=ACTIVATIONS[cfg.mlp_activation],
            mamba_state_dim=cfg.mamba_state_dim,
            mamba_head_dim=cfg.mamba_head_dim,
            mamba_num_groups=cfg.mamba_num_groups,
            mamba_num_heads=cfg.mamba_num_heads,
            use_mamba_mem_eff_path=mem_eff_path_available(),
            **moe,
        )

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> HybridModel:
        """MCore's HybridModel for one stage (:meth:`hybrid_model_kwargs`)."""
        return HybridModel(**self.hybrid_model_kwargs(pg_collection, pre_process, post_process, vp_stage))

    def hybrid_model_kwargs(self, pg_collection, pre_process=None, post_process=None, vp_stage=None) -> dict:
        """The keyword arguments of MCore's ``HybridModel`` for one stage on ``pg_collection``
        (on CPU, installs the pure-torch Mamba kernels first)."""
        from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage

        cfg = self.config
        if resolve_device().type == "cpu":
            mamba_cpu.install_cpu_kernels()
        tp = pg_collection.tp.size()
        return dict(
            config=self.transformer_config(pg_collection),
            hybrid_stack_spec=hybrid_stack_spec(use_te(cfg.impl), cfg.num_experts, core_attention(cfg.impl)),
            vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
            if cfg.pad_vocab else cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            hybrid_layer_pattern=cfg.hybrid_layer_pattern,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            pre_process=is_pp_first_stage(pg_collection.pp) if pre_process is None else pre_process,
            post_process=is_pp_last_stage(pg_collection.pp) if post_process is None else post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )

    # --- export to MCore's MimoModel (mimo_builder._internal.interop) ---------------------------------

    mimo_roles = frozenset({"language"})

    def mimo_spec(self, role, pg_collection) -> ModuleSpec:
        """As MIMO's language model: MCore's HybridModel, whole (one pipeline stage)."""
        self.check_mimo_role(role)
        return ModuleSpec(module=HybridModel, params=self.hybrid_model_kwargs(pg_collection, True, True))

    def mimo_special_token_ids(self) -> dict[str, int]:
        """Input port -> placeholder token id (``modality_token_ids``)."""
        return dict(self.config.modality_token_ids)

    def hf_mapping(self):
        """Hugging Face weights: ``Mamba2ForCausalLM`` for an all-Mamba pattern (:mod:`submodels.hf_mamba`),
        ``NemotronHForCausalLM`` for a hybrid one (:mod:`submodels.hf_nemotron_h`)."""
        hybrid = set(self.config.layer_symbols) != {"M"}
        return self.hf_mapping_for({"model_type": "nemotron_h" if hybrid else "mamba2"})

    def hf_mapping_for(self, hf_config: dict):
        """The mapping that reads a folder by its config.json ``model_type`` (in a LLaVA folder, its
        ``text_config``'s): ``nemotron_h`` folders through Nemotron-H's, all-Mamba ones too."""
        section = hf_config.get("text_config", hf_config)
        if isinstance(section, dict) and section.get("model_type") == "nemotron_h":
            from submodels.hf_nemotron_h import nemotron_h_mapping

            return nemotron_h_mapping(self.config)
        from submodels.hf_mamba import mamba2_mapping

        return mamba2_mapping(self.config)

    def stage_costs(self, config, micro_batch, tokens):
        """Per virtual stage, full ``seq_length`` sequences: see :mod:`submodels.mamba_costs`."""
        return hybrid_stage_costs(self.config, config, micro_batch, self.planned_tokens(tokens))

    def run(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embed ``input_ids``, put each modality's embeddings at its placeholder tokens, run the
        stack; returns ``loss`` (mean over ``loss_mask``) when labels are given, else ``logits``."""
        return self.run_stage(model, inputs, None, first=True, last=True)

    def run_stage(self, model, inputs, hidden, first, last) -> dict[str, torch.Tensor]:
        """One pipeline stage: the first embeds and places modalities, later ones continue from
        the previous stage's hidden states ([tokens, batch, hidden]), the last computes the loss.
        With ``seq_lengths`` a training step packs the samples several to a row (:meth:`packing`)."""
        self._check_trainable_experts()
        ids = inputs["input_ids"]
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        core = unwrap(model)
        cp = getattr(core, "pg_collection", None) and core.pg_collection.cp
        packing = self.packing(inputs, core.training)
        if packing is not None and first:  # counted once per microbatch, by the first pipeline stage
            self.packed = packing.count() if self.packed is None else self.packed + packing.count()
        embedded = None
        if first:
            embedded = core.embedding(input_ids=ids, position_ids=positions)  # [tokens, batch, hidden]
            embedded = place_modalities(embedded, ids, self.config.modality_token_ids, inputs)
            if packing is not None:  # each token, its placed modality included, moves to its packed row
                embedded = packing.pack(embedded.transpose(0, 1)).transpose(0, 1).contiguous()
            if cp_size(cp) > 1:  # the whole sequence is embedded, then split: placeholders anywhere
                embedded = split_for_cp_rank({"e": embedded.transpose(0, 1)}, cp)["e"].transpose(0, 1)
        else:
            core.set_input_tensor(hidden)
        labels = inputs.get("labels") if last else None
        mask = inputs.get("loss_mask") if last else None
        mask = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
        if packing is not None:
            return self._run_packed(model, packing, embedded, ids, labels, mask, last)
        local = split_for_cp_rank({"labels": labels, "mask": mask} if labels is not None else {}, cp)
        evaluating = last and labels is not None and not core.training
        out = model(ids, positions, None, decoder_input=embedded, labels=None if evaluating else local.get("labels"))
        if not last:
            return {"hidden": out}
        if labels is None:  # the padded vocabulary's extra columns cut (a TP slice is joined and cut later)
            outputs = {"logits": out[..., :self.config.vocab_size] if out.shape[-1] > self.config.vocab_size else out}
            if first and cp_size(cp) == 1 and self.uses_output("generated") and self.generation is not None:
                prompts = prompt_ends(ids, inputs.get("loss_mask"), self.generation.pad_id)  # a label-free graph
                outputs["generated"] = self._generate(model, core, inputs, ids, prompts, self.generation)
            return outputs
        if evaluating:
            outputs = self._evaluate(core, out, local, mask, cp)
            if first and cp_size(cp) == 1:  # the whole model and sequence here: decoding from prompts
                outputs.update(self._decoded(model, core, inputs, ids, positions, labels, mask))
            return outputs
        # under cp > 1 this CP rank's share: its tokens' losses over the whole sequence's count
        return {"loss": (out.float() * local["mask"]).sum() / mask.sum().clamp(min=1.0)}

    def packing(self, inputs: dict[str, torch.Tensor], training: bool) -> Packing | None:
        """The packed layout of this microbatch: when ``seq_lengths`` arrives with labels in a
        training step (evaluation and logits run one sample per row, which computes the same)."""
        lengths = inputs.get(LENGTHS_PORT)
        if lengths is None or inputs.get("labels") is None or not training:
            return None
        return Packing.plan(lengths, inputs["input_ids"].shape[1], self.config.seq_length)

    def _run_packed(self, model, packing, embedded, ids, labels, mask, last) -> dict[str, torch.Tensor]:
        """The stack over packed rows: MCore's packed-sequence parameters restart each Mamba layer's
        state at every sample, attention is causal within each sample; the loss is the same sum
        over the same tokens. (RoPE runs over row positions: under the per-sample mask it sees
        only differences of positions inside one sample, the same as from each sample's start.)"""
        attention = packing.attention_mask() if "*" in self.config.hybrid_layer_pattern else None
        packed_labels = packing.pack(labels) if labels is not None else None
        out = model(packing.pack(ids), packing.positions(), attention, decoder_input=embedded,
                    labels=packed_labels, packed_seq_params=packing.seq_params())
        if not last:
            return {"hidden": out}
        return {"loss": (out.float() * packing.pack(mask)).sum() / mask.sum().clamp(min=1.0)}

    def _evaluate(self, core, logits, local, mask, cp) -> dict[str, torch.Tensor]:
        """Eval mode: the loss from the logits ([batch, tokens, vocab / tp]) and, per sample,
        whether greedy decoding writes every label under the loss mask (``correct``)."""
        token_losses = core.compute_language_model_loss(local["labels"], logits.transpose(0, 1).contiguous())
        outputs = {"loss": (token_losses.float() * local["mask"]).sum() / mask.sum().clamp(min=1.0)}
        predictions = greedy_predictions(logits, core.output_layer.tp_group, self.config.vocab_size)
        outputs["correct"] = exact_match(predictions, local["labels"], local["mask"], cp)
        return outputs

    def _decoded(self, model, core, inputs, ids, positions, labels, mask) -> dict[str, torch.Tensor]:
        """The outputs that decode from each prompt (the ids before the first loss-masked label),
        where the graph reads them: ``generated`` and ``free_running``."""
        answer = mask > 0
        prompts = prompt_ends(ids, mask, None)
        outputs = {}
        if self.uses_output("generated") and self.generation is not None:
            outputs["generated"] = self._generate(model, core, inputs, ids, prompts, self.generation)
        if self.uses_output("free_running"):  # the last learned span, from everything before it
            final = last_span(answer)
            starts = torch.where(final.any(dim=1), final.float().argmax(dim=1) + 1, prompts)
            new = self._generate(model, core, inputs, ids, starts,
                                 GenerationOptions(max_new_tokens=max(int(final.sum(dim=1).max()), 1)))
            predicted = torch.full_like(labels, -1)
            rows, cols = torch.nonzero(final, as_tuple=True)
            predicted[rows, cols] = new[rows, (final.long().cumsum(dim=1) - 1)[rows, cols]]
            outputs["free_running"] = exact_match(predicted, labels, final.float())
        return outputs

    def _generate(self, model, core, inputs, ids, prompts, options) -> torch.Tensor:
        """New tokens after each row's prompt: prefilled once, then one incremental step per token."""
        def embed(window, window_positions, place: bool):
            embedded = core.embedding(input_ids=window, position_ids=window_positions)
            return place_modalities(embedded, window, self.config.modality_token_ids, inputs) if place else embedded

        return generate(model, core, self.config.vocab_size, embed, ids, prompts, options,
                        banned=sorted(self.config.modality_token_ids.values()), rows=inputs.get(SAMPLE_INDEX))

    def training_problems(self, trains: bool) -> list[str]:
        """MoE layers with biases cannot train on the local spec (no Transformer Engine here)."""
        cfg = self.config
        if trains and cfg.num_experts and cfg.transformer.get("add_bias_linear", True) and not use_te(cfg.impl):
            return ["config.transformer.add_bias_linear: MCore's local expert MLP adds its bias in place to the "
                    "output of a custom autograd function, so MoE layers with biases cannot train on the local "
                    "spec; set transformer.add_bias_linear: false"]
        return []

    def packing_problems(self) -> list[str]:
        """MCore's Mamba mixer takes packed rows on its training path only, which needs causal-conv1d on CUDA."""
        if self.config.hybrid_layer_pattern.count("M") and not self.config.transformer.get(
                "use_mamba_mem_eff_path", mem_eff_path_available()):
            return ["config.transformer.use_mamba_mem_eff_path: packed rows need MCore's Mamba training path "
                    "(mamba-ssm's fused conv + scan), which needs causal-conv1d on CUDA: install it, or drop --pack"]
        return []

    def _check_trainable_experts(self) -> None:
        problems = self.training_problems(trains=torch.is_grad_enabled())
        if problems:
            raise ConfigError(f"MambaConfig.{problems[0].removeprefix('config.')}")

    def synthetic_inputs(self, batch_size, generator, tokens):
        """Token sequences that count upwards (learnable), after one placeholder run per modality;
        the length a multiple of 16 where ``seq_length`` allows (context parallelism needs 2 * cp)."""
        cfg = self.config
        prefix = [torch.full((tokens[port],), token) for port, token in cfg.modality_token_ids.items()
                  if port in tokens]
        prefix = torch.cat(prefix) if prefix else torch.zeros(0, dtype=torch.long)
        text = min(32, cfg.seq_length - len(prefix))
        if text - (len(prefix) + text) % 16 >= 2:  # a multiple of 16 tokens: splits evenly up to cp=8
            text -= (len(prefix) + text) % 16
        if text < 2:
            arriving = ", ".join(f"{port} {count}" for port, count in tokens.items())
            raise ConfigError(f"config.seq_length: {cfg.seq_length} leaves no room for text after {len(prefix)} "
                              f"modality tokens ({arriving}); it must be at least {len(prefix) + 2}")
        reserved = max(cfg.modality_token_ids.values(), default=-1) + 1
        start = torch.randint(reserved, cfg.vocab_size, (batch_size, 1), generator=generator)
        counting = reserved + (start + torch.arange(text + 1) - reserved) % (cfg.vocab_size - reserved)
        ids = torch.cat([prefix.expand(batch_size, -1), counting[:, :-1]], dim=1)
        labels = torch.cat([prefix.expand(batch_size, -1), counting[:, 1:]], dim=1)
        loss_mask = torch.ones_like(ids, dtype=torch.float32)
        loss_mask[:, :len(prefix)] = 0.0  # no loss where the label is a placeholder
        return {"input_ids": ids, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(ids.shape[1]).expand_as(ids).contiguous(),
                LENGTHS_PORT: torch.full((batch_size,), ids.shape[1])}


def last_span(learned: torch.Tensor) -> torch.Tensor:
    """Per row, the last run of learned positions ([batch, tokens] bool): a conversation's final
    assistant turn (a one-answer sample's whole answer)."""
    at = torch.arange(learned.shape[1], device=learned.device).expand_as(learned)
    last = torch.where(learned, at, -1).max(dim=1, keepdim=True).values
    gap = torch.where(~learned & (at < last), at, -1).max(dim=1, keepdim=True).values
    return learned & (at > gap) & (at <= last)


def place_modalities(embedded: torch.Tensor, ids: torch.Tensor, token_ids: dict[str, int],
                     inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Replace each placeholder token's embedding by the modality's embeddings, in order.

    ``embedded`` is [tokens, batch, hidden]; a modality input is [batch, n, hidden] and each
    sample holds n placeholders of that modality's token id, or (ragged items, padded to the
    longest sample) at most n: its first rows fill them. One out-of-place write
    in the embedding's own layout (no transposed copies).
    """
    tokens, samples, rows = [], [], []
    for port, token in token_ids.items():
        where = ids == token
        counts = where.sum(dim=1)
        if port not in inputs:
            if bool(counts.any()):
                raise ValueError(f"MambaConfig.modality_token_ids[{port!r}]: the batch has placeholder "
                                 f"tokens {token} but no '{port}' embeddings arrived")
            continue
        values = inputs[port]
        exact = bool((counts == values.shape[1]).all())
        if not exact and bool((counts > values.shape[1]).any()):
            raise ValueError(f"MambaConfig.modality_token_ids[{port!r}]: samples hold {counts.tolist()} "
                             f"placeholder tokens (id {token}) but '{port}' brings {values.shape[1]} "
                             "embeddings per sample (for synthetic batches the placeholders number what "
                             "the upstream builder's output_tokens() declares)")
        sample, position = where.nonzero(as_tuple=True)  # sample by sample, positions in order
        samples.append(sample)
        tokens.append(position)
        if exact:
            rows.append(values.reshape(-1, values.shape[-1]))
        else:  # ragged items: each sample's first rows are its items' tokens, the rest padding
            used = torch.arange(values.shape[1], device=values.device) < counts.unsqueeze(1)
            rows.append(values[used])
    if not rows:
        return embedded
    return embedded.index_put((joined(tokens), joined(samples)), joined(rows).to(embedded.dtype))
