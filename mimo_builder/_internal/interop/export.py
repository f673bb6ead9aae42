"""Export a star-shaped graph to MCore's ``MimoModel`` with the project's weights.

Each node becomes one part of the MimoModel, built by MIMO from the ModuleSpec the node's builder
gives (:meth:`ModelBuilder.mimo_spec`), on the node's own process groups:

==========  =====================================================  ===========================
role        MimoModel module (state-dict prefix)                   MIMO name
==========  =====================================================  ===========================
language    ``language_model.``                                    ``"language"`` grid key
encoder     ``modality_submodules.<port>.encoders.<node>.``        modality = the language
                                                                   node's input port
projection  ``modality_submodules.<port>.input_projections.0.``    (same modality)
==========  =====================================================  ===========================

The weights are then copied node by node, every key matched (a missing or extra key is an error).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mimo_builder._internal.platform.compat import init_runtime, seed_rng
from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.interop.star import LANGUAGE_INPUTS, Star, check_exportable, star_shape
from mimo_builder._internal.placement import ProcessGroups, create_process_groups
from mimo_builder._internal.assembly.lora import merged_state_dict
from mimo_builder._internal.assembly.seeded_init import init_from_seed
from mimo_builder._internal.assembly.tp_shard import unwrap
from mimo_builder._internal.validation import ValidGraph, validate_graph
from mimo_builder._internal.assembly.walker import CompositeModel

MIMO_LANGUAGE_KEY = "language"
"""MCore's key for the language model in ``module_to_grid_map`` (``MIMO_LANGUAGE_MODULE_KEY``)."""


def to_mimo_model(source: Graph | CompositeModel, *, seed: int = 1234, device: str = "auto"):
    """An MCore ``MimoModel`` of a star-shaped graph, on this rank.

    ``source`` is a built :class:`CompositeModel` (its weights, including pretrained ``init``
    weights, and its process groups: keep it open while the MimoModel is used) or a
    :class:`Graph` (process groups created here, held by the model as ``mimo_builder_groups``;
    weights equal to those ``CompositeBuilder(graph, seed=seed)`` builds, without graph-level
    hooks or ``init`` sources). Graphs MIMO cannot express are refused with a ConfigError before
    anything is built (:func:`check_exportable`). Needs ``torch.distributed`` initialised.
    """
    graph = source.valid.graph if isinstance(source, CompositeModel) else source
    if not dist.is_initialized():
        raise MimoError("to_mimo_model builds on process groups: initialise torch.distributed first "
                        "(e.g. under mimo_builder._internal.platform.launch or torchrun)")
    valid, star = check_exportable(graph, dist.get_world_size(), device)
    init_runtime(device)  # a fresh process too: MCore's CPU workarounds, idempotent
    groups = source.process_groups if isinstance(source, CompositeModel) else create_process_groups(
        valid.layouts.values())
    language = _groups_here(valid, groups, star.language)
    seed_rng(seed, tp_rank=language.tp.rank(), ep_rank=language.ep.rank(), etp_rank=language.expt_tp.rank())
    model = _mimo_model(valid, star, groups)  # MCore draws its (overwritten) weights from the seeded tracker
    if not isinstance(source, CompositeModel):
        model.mimo_builder_groups = groups
    for name in valid.order:
        pgs = groups.for_layout(valid.layouts[name])
        weights = source.chunks(name)[0] if isinstance(source, CompositeModel) else _seeded(valid, name, pgs, seed)
        part = model.get_submodule(mimo_module_prefix(star, name).rstrip("."))
        _copy_weights(name, unwrap(weights), part)
        if valid.graph.nodes[name].frozen:
            part.requires_grad_(False)
    return model


def mimo_model_config(valid: ValidGraph, star: Star, groups: ProcessGroups):
    """The ``MimoModelConfig`` of ``star`` on this rank's groups (every node is on this rank: the
    export is colocated). ``module_to_grid_map`` is set only where layouts differ."""
    from megatron.core.models.mimo import MimoModelConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mimo_builder._internal.interop.modality import EncoderModality

    def spec(node: str, role: str):
        return valid.builders[node].mimo_spec(role, _groups_here(valid, groups, node))

    modalities = {}
    for m in star.modalities:
        projections = [spec(m.projection, "projection")] if m.projection else []
        modalities[m.name] = ModuleSpec(
            module=EncoderModality, params={"pg_collection": _groups_here(valid, groups, m.encoder)},
            submodules={"encoders": {m.encoder: spec(m.encoder, "encoder")}, "input_projections": projections})
    tokens = valid.builders[star.language].mimo_special_token_ids()
    return MimoModelConfig(
        language_model_spec=spec(star.language, "language"),
        modality_submodules_spec=modalities,
        special_token_ids={m.name: tokens[m.name] for m in star.modalities},
        module_to_grid_map=_grid_map(valid, star, groups),
    )


def mimo_module_prefix(star: Star, node: str) -> str:
    """Where ``node``'s parameters live in the MimoModel's state dict (a prefix ending in '.')."""
    role = star.roles()[node]
    if role == "language":
        return "language_model."
    modality = star.modality_of(node).name
    if role == "encoder":
        return f"modality_submodules.{modality}.encoders.{node}."
    return f"modality_submodules.{modality}.input_projections.0."


def mimo_forward_inputs(graph: Graph, batch: dict[str, torch.Tensor]) -> dict:
    """``MimoModel.forward`` keyword arguments for a batch of the graph (same keys as the
    project's runtime takes): the language node's token inputs (positions 0..S-1 when unbound,
    as the project's language models assume) and ``modality_inputs`` by modality and encoder."""
    valid = validate_graph(graph)
    star = star_shape(valid)
    out = {port: batch[key] for key, (node, port) in valid.inputs.items()
           if node == star.language and port in LANGUAGE_INPUTS}
    if "position_ids" not in out:
        ids = out["input_ids"]
        out["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    out["modality_inputs"] = {}
    for m in star.modalities:
        keywords = valid.builders[m.encoder].mimo_encoder_keywords
        bound = {keywords.get(port, port): batch[key] for key, (node, port) in valid.inputs.items()
                 if node == m.encoder}
        out["modality_inputs"][m.name] = {m.encoder: bound}
    return out


def _mimo_model(valid: ValidGraph, star: Star, groups: ProcessGroups):
    from megatron.core.models.mimo import MimoModel

    language = _groups_here(valid, groups, star.language)
    return MimoModel(mimo_model_config(valid, star, groups), cp_group=language.cp, tp_group=language.tp)


def _groups_here(valid: ValidGraph, groups: ProcessGroups, node: str):
    pgs = groups.for_layout(valid.layouts[node])
    if pgs is None:
        raise MimoError(f"rank {dist.get_rank()} holds no part of node '{node}': call to_mimo_model on the "
                        "language model's ranks only (the exported MimoModel is colocated)")
    return pgs


def _grid_map(valid: ValidGraph, star: Star, groups: ProcessGroups):
    layouts = {m.name: valid.layouts[m.encoder] for m in star.modalities}
    layouts[MIMO_LANGUAGE_KEY] = valid.layouts[star.language]
    if len(set(layouts.values())) == 1:
        return None  # one layout: MIMO's colocated path, no communicators
    return {name: groups.grids[layout] for name, layout in layouts.items()}


def _seeded(valid: ValidGraph, name: str, pgs, seed: int) -> torch.nn.Module:
    """``name`` built as the walker builds it from ``seed`` (unwrapped)."""
    seed_rng(seed, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank())
    builder = valid.builders[name]
    (chunk,) = builder.build_distributed_models(pgs, wrap_with_ddp=False, mixed_precision_wrapper=None)
    return init_from_seed([chunk], seed=seed, node=name, rules=builder.param_inits(), pg_collection=pgs)[0]


def _copy_weights(name: str, source: torch.nn.Module, part: torch.nn.Module) -> None:
    result = part.load_state_dict(merged_state_dict(source), strict=False)  # LoRA folded in
    if result.missing_keys or result.unexpected_keys:
        raise MimoError(f"node '{name}': its MIMO part does not hold the same tensors as its build: missing "
                        f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; its builder's "
                        "mimo_spec() must build the module build_model() builds")
