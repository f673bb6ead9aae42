"""Dry-run plan: what each rank would host, with coordinates, parameter counts and group count.

No processes are started. Rank placement is pure arithmetic over the layouts, so it scales to
any world size. Parameter counts come from building each node once per pipeline stage on the
meta device, in this process, on torch's "fake" process-group backend (a world the size of one
model-parallel replica, no communication), so counts are exactly what MCore would allocate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.placement import Layout, count_process_groups, create_process_groups
from mimo_builder._internal.validation import ValidGraph, validate_graph
from mimo_builder._internal.platform import private


@dataclass
class NodePlan:
    """One node: where it lives and how many parameters each of its pipeline stages holds."""

    name: str
    builder: str
    layout: Layout
    frozen: bool
    stage_params: list[int] | None = None
    """Parameters on one rank of each pipeline stage (None when not counted)."""

    params: int | None = None
    """Parameters of the whole node, unsharded (None when not counted)."""

    stage_trainable: list[int] | None = None
    """Of ``stage_params``, those that train (all but a LoRA node's frozen base)."""

    trainable_params: int | None = None
    """Of ``params``, those that train (a LoRA node: its adapters)."""

    transformer_config: Any = None
    """The MCore TransformerConfig the node builds with on its layout (None when not counted):
    what :mod:`mimo_builder._internal.planning.estimate` reads for dtype, parallel sizes and recomputation."""


@dataclass
class Plan:
    """The dry-run result for one graph and one world size."""

    world_size: int
    nodes: list[NodePlan]
    num_groups: int
    valid: ValidGraph

    def hosted(self, rank: int) -> list[tuple[NodePlan, dict[str, int]]]:
        """The nodes ``rank`` hosts, each with the rank's tp/cp/dp/pp coordinates."""
        return [(n, n.layout.coords(rank)) for n in self.nodes if rank in n.layout.ranks]

    def rank_params(self, rank: int) -> int | None:
        """Parameters held by ``rank`` (None when counts were not computed)."""
        hosted = self.hosted(rank)
        if any(n.stage_params is None for n, _ in hosted):
            return None
        return sum(n.stage_params[c["pp"]] for n, c in hosted)

    def as_dict(self, estimates=None) -> dict:
        """The plan as JSON-ready data; with ``estimates`` (:func:`mimo_builder._internal.planning.estimate.estimate_plan`)
        each node and rank also carries ``memory_bytes`` and ``flops_per_step`` (None without)."""
        empty = {"memory_bytes": None, "flops_per_step": None}
        return {
            "world_size": self.world_size,
            "num_process_groups": self.num_groups,
            "nodes": [{"name": n.name, "builder": n.builder, "frozen": n.frozen, "offset": n.layout.offset,
                       "size": n.layout.size, "tp": n.layout.tp, "cp": n.layout.cp, "pp": n.layout.pp,
                       "dp": n.layout.dp, "ep": n.layout.ep, "params": n.params, "stage_params": n.stage_params,
                       "trainable_params": n.trainable_params,
                       **(estimates.node_dict(n.name, self) if estimates else empty)}
                      for n in self.nodes],
            "ranks": [{"rank": r, "params": self.rank_params(r), "nodes": {n.name: _with_ep(n.layout, c, r)
                                                                           for n, c in self.hosted(r)},
                       **(estimates.rank_dict(r) if estimates else empty)} for r in range(self.world_size)],
            "estimates": estimates.summary_dict() if estimates else None,
            "warnings": estimates.warnings if estimates else [],
        }


def _with_ep(layout: Layout, coords: dict[str, int], rank: int) -> dict[str, int]:
    """A rank's coordinates, with its expert-parallel one on a node with ep > 1."""
    return {**coords, "ep": layout.expert_coords(rank)["ep"]} if layout.ep > 1 else coords


def make_plan(graph: Graph, world_size: int, count_params: bool = True) -> Plan:
    """Validate ``graph`` for ``world_size`` ranks and plan it without starting processes."""
    valid = validate_graph(graph, world_size)
    nodes = [NodePlan(name, graph.nodes[name].builder, valid.layouts[name], graph.nodes[name].frozen)
             for name in valid.order]
    if count_params:
        for node in nodes:
            counts = _count_stages(valid, node.name, _smallest_replica(node.layout))
            node.stage_params = [c.held for c in counts]
            node.stage_trainable = [c.trainable for c in counts]
            node.transformer_config = counts[0].config
            node.params, node.trainable_params = _node_total(valid, node, counts)
    return Plan(world_size, nodes, count_process_groups(valid.layouts.values()), valid)


@dataclass(frozen=True)
class _StageCount:
    held: int
    """Parameters on one rank of the stage."""
    copies: int
    """Of them, copies of a weight another stage holds (MCore's ``shared``)."""
    trainable: int
    """Of them, those that train."""
    trainable_copies: int
    """Of the copies, those that train."""
    config: Any
    """The TransformerConfig they were built with."""


def _node_total(valid: ValidGraph, node: NodePlan, counts: list[_StageCount]) -> tuple[int, int]:
    """Whole-node (parameters, trainable parameters): the meta build at TP=EP=1 summed over
    stages, a tied embedding's copy on the last pipeline stage counted once (it is on that
    rank, but the same weight)."""
    layout = node.layout
    if layout.tp != 1 or layout.ep != 1:
        counts = _count_stages(valid, node.name, Layout(0, layout.pp, pp=layout.pp))
    params = sum(c.held - c.copies for c in counts)
    return params, 0 if node.frozen else sum(c.trainable - c.trainable_copies for c in counts)


def _count_stages(valid: ValidGraph, name: str, layout: Layout) -> list[_StageCount]:
    return [_count_on_fake_world(valid, name, layout, stage) for stage in range(layout.pp)]


def _smallest_replica(layout: Layout) -> Layout:
    """The same split with the fewest data-parallel replicas that still fits the expert grid."""
    per_stage = layout.tp * layout.cp
    experts = layout.expert_tp * layout.ep
    dp = experts // math.gcd(experts, per_stage)
    return Layout(0, per_stage * dp * layout.pp, layout.tp, layout.cp, layout.pp, layout.ep, layout.etp)


def _count_on_fake_world(valid: ValidGraph, name: str, layout: Layout, stage: int) -> _StageCount:
    """The parameters of one rank at pipeline ``stage`` of ``layout``, built on meta in a fake
    world (with the node's LoRA adapters)."""
    private.register_fake_backend()

    from mimo_builder._internal.assembly.lora import add_adapters
    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.platform import compat

    if dist.is_initialized():
        raise RuntimeError("make_plan counts parameters on a fake world; call it before torch.distributed "
                           "is initialised, or pass count_params=False")
    rank = stage * layout.size // layout.pp
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=layout.size)
    try:
        with compat.cpu_scope():  # leaves no trace: the process may use CUDA afterwards
            pgs = create_process_groups([layout]).for_layout(layout)
            compat.seed_rng(0, tp_rank=pgs.tp.rank())
            builder = valid.configs[name].make_builder()
            config = builder.transformer_config(pgs)
            chunks = distributed.build_chunks(builder.build_model, config, pgs, meta=True)
            lora = valid.graph.nodes[name].lora
            if lora is not None:
                add_adapters(chunks, lora, 0, name)
            params = [p for chunk in chunks for p in chunk.parameters()]
            shared = [p for p in params if getattr(p, "shared", False)]
            trained = [p for p in params if p.requires_grad or lora is None]
            return _StageCount(_numel(params), _numel(shared), _numel(trained),
                               _numel(p for p in shared if p.requires_grad or lora is None), config)
    finally:
        dist.destroy_process_group()


def _numel(params) -> int:
    return sum(p.numel() for p in params)
