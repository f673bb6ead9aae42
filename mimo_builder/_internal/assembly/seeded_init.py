"""Initialisation that does not depend on the placement: each parameter drawn whole from its own seed.

MCore draws a node's weights from generators whose state depends on where the node is placed:
the default generator runs through one pipeline stage's layers and one expert-parallel rank's
experts only, and the model-parallel tracker is seeded per TP rank (Mamba's convolution, dt and
A on any device, every sharded weight on GPU). Here each parameter a rule covers is drawn
again: its full tensor, in float32 on CPU, from a generator seeded by (graph seed, node, the
parameter's name in the whole model: global layer number, global expert index), with the
distribution MCore gives it; then this rank's shard is copied in (:func:`tp_shard.shard`, part
by part where the parameter packs several). So a node built from a seed has the same full
weights at any TP, PP, EP, CP or DP. Constant parameters (biases, norms, Mamba's D) need no rule,
and a covered parameter that holds one value (a layer a kind zero-initialises) is left as it is.

A rule ``rule(module, full)`` fills ``full`` (the parameter's full shape) from torch's default
CPU generator, which is seeded for that parameter and restored afterwards. Rules are keyed by
(module class, parameter name relative to it); the outermost module with a rule for a parameter
wins, and a subclass's rule its base's. :data:`MCORE_RULES` covers Megatron-Core's layers; a
builder adds its own modules' rules with ``param_inits()``. Plain torch modules keep their own
draw from the default generator, which the walker seeds alike for each node on every rank: the
same at any placement unless a placement-dependent draw (a pipeline stage's or an EP rank's
layers) comes before them in the same chunk. Not covered yet: Transformer Engine's layers (on
GPU they keep MCore's draw, per TP rank) and MuP's output-layer init.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from typing import Callable, Mapping

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.moe.router import Router

from mimo_builder._internal.assembly.tp_shard import shard

ParamInit = Callable[[torch.nn.Module, torch.Tensor], None]
"""Fills a float32 CPU tensor of a parameter's full shape, from torch's default CPU generator."""

Rules = Mapping[tuple[type, str], ParamInit]

SHARED_EMBEDDING = "embedding.word_embeddings.weight"
"""The name (and seed) of a language model's input embedding; a tied output layer on a later
pipeline stage (MCore's ``shared_embedding``) draws the same tensor."""


def config_init(method: str) -> ParamInit:
    """A rule calling the module's TransformerConfig init method ``method`` (e.g. ``init_method``)."""
    def rule(module: torch.nn.Module, full: torch.Tensor) -> None:
        getattr(module.config, method)(full)

    return rule


MCORE_RULES: Rules = {
    (ColumnParallelLinear, "weight"): config_init("init_method"),
    (RowParallelLinear, "weight"): config_init("output_layer_init_method"),
    (VocabParallelEmbedding, "weight"): config_init("embedding_init_method"),
    (LanguageModelEmbedding, "position_embeddings.weight"): config_init("embedding_init_method"),
    (LanguageModelEmbedding, "tokentype_embeddings.weight"): config_init("embedding_init_method"),
    (Router, "weight"): config_init("init_method"),
    (Router, "bias"): config_init("init_method"),
}
"""Megatron-Core's parallel linears and embeddings and its MoE router, each with the init method
of the TransformerConfig MCore passes it."""

_TIED = config_init("embedding_init_method")


def seeded_hook(seed: int, node: str, rules: Rules, pg_collection) -> Callable[[list], list]:
    """A pre-wrap hook drawing ``node``'s covered parameters from ``seed`` (``rules`` add to MCORE_RULES)."""
    return functools.partial(init_from_seed, seed=seed, node=node, rules=rules, pg_collection=pg_collection)


def init_from_seed(chunks: list[torch.nn.Module], *, seed: int, node: str, rules: Rules | None = None,
                   pg_collection) -> list[torch.nn.Module]:
    """Draw every parameter of ``chunks`` that a rule covers from its own seed; returns ``chunks``.
    Nothing is drawn where the config turns MCore's initialisation off or a parameter is on meta."""
    merged = {**MCORE_RULES, **(rules or {})}
    for chunk in chunks:
        if not getattr(getattr(chunk, "config", None), "perform_initialization", True):
            continue
        name_of = invariant_names(chunk)
        for name, (module, rule, param) in covered(chunk, merged).items():
            if getattr(param, "shared_embedding", False):  # tied across stages: both draw the embedding
                name, rule = SHARED_EMBEDDING, _TIED
            if not (param.is_meta or _constant(param)):
                _draw_into(param, module, rule, _param_seed(seed, node, name_of(name)), pg_collection)
    return chunks


def covered(chunk: torch.nn.Module, rules: Rules) -> dict[str, tuple[torch.nn.Module, ParamInit, torch.nn.Parameter]]:
    """Parameter name in ``chunk`` -> (the module whose rule draws it, the rule, the parameter)."""
    by_class: dict[type, list[tuple[str, ParamInit]]] = defaultdict(list)
    for (cls, relative), rule in rules.items():
        by_class[cls].append((relative, rule))
    found = {}
    for prefix, module in chunk.named_modules():  # parents before children: the outermost rule wins
        for cls in type(module).__mro__:  # a subclass's rule before its base's
            for relative, rule in by_class.get(cls, ()):
                param = _parameter(module, relative)
                if param is not None:
                    found.setdefault(f"{prefix}.{relative}" if prefix else relative, (module, rule, param))
    return found


def invariant_names(chunk: torch.nn.Module) -> Callable[[str], str]:
    """A parameter's name in ``chunk`` -> its name in the whole model, the same on every placement:
    MCore's layers by their global ``layer_number``, MoE experts by their global index."""
    layers, offsets = {}, {}
    for prefix, module in chunk.named_modules():
        number = getattr(module, "layer_number", None)
        if isinstance(number, int) and prefix:
            layers[prefix] = f"layer{number}"
        if isinstance(getattr(module, "local_experts", None), torch.nn.ModuleList) and hasattr(module, "ep_group"):
            offsets[prefix] = module.ep_group.rank() * module.num_local_experts

    def rename(name: str) -> str:
        parts = name.split(".")
        if "local_experts" in parts:
            i = parts.index("local_experts")
            offset = offsets.get(".".join(parts[:i]))
            if offset is not None:
                parts[i:i + 2] = ["experts", str(offset + int(parts[i + 1]))]
        for i in range(1, len(parts)):  # the outermost layer holding it
            owner = ".".join(parts[:i])
            if owner in layers:
                return ".".join([layers[owner], *parts[i:]])
        return ".".join(parts)

    return rename


def _constant(param: torch.nn.Parameter) -> bool:
    """One value throughout (zeros, ones): set, not drawn, e.g. by a kind that zero-initialises a layer."""
    flat = param.detach().flatten()
    return flat.numel() > 1 and bool((flat == flat[0]).all())


def _parameter(module: torch.nn.Module, relative: str) -> torch.nn.Parameter | None:
    try:
        return module.get_parameter(relative)
    except AttributeError:  # not there, or None (a layer without bias)
        return None


def _draw_into(param: torch.nn.Parameter, module: torch.nn.Module, rule: ParamInit, key: int, pg_collection) -> None:
    """Draw the full tensor with ``rule`` from seed ``key`` and copy this rank's TP shard into ``param``."""
    group = pg_collection.tp if getattr(param, "allreduce", True) else pg_collection.expt_tp  # experts: expert TP
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= group.size()
    full = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(key)
        rule(module, full)
    with torch.no_grad():
        param.copy_(shard(full, param, group.rank(), group.size()))


def _param_seed(seed: int, node: str, name: str) -> int:
    """A 63-bit seed of (graph seed, node, placement-invariant parameter name)."""
    digest = hashlib.sha256(f"{seed}/{node}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
