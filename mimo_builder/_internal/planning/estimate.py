"""Memory and compute per rank for a dry-run :class:`~mimo_builder._internal.planning.plan.Plan`: arithmetic only.

**Memory** of a node on one of its ranks (bytes):

- ``params``: the rank's parameters (the plan's meta-device count at its pipeline stage) times
  the parameter dtype's size (``dtype`` bf16/fp16: Float16Module holds every parameter in it);
- ``grads``: MCore DDP's gradient buffer, one element per trained parameter (a LoRA node's
  adapters only), fp32 when the node's DDP options say ``grad_reduce_in_fp32``, else the
  parameter dtype; none for a frozen node;
- ``optimizer``: Adam's two fp32 moments (SGD: one momentum buffer unless ``sgd_momentum`` is
  0), fp32 master weights for 16-bit parameters (trained parameters only), and the fp32 copy of 16-bit gradients MCore's
  mixed-precision optimizer makes; divided over the node's DP x CP group with the distributed
  optimizer (Megatron's table: 18 bytes per bf16 parameter with fp32 gradients, 6 + 12/d
  distributed);
- ``activations``: the bytes each (virtual) stage keeps for backward per microbatch (the
  builder's :meth:`~mimo_builder._internal.kinds.builder.ModelBuilder.stage_costs`) times the microbatches in
  flight on the rank, walked along the rank's 1F1B order from the pipeline plan (a forward adds
  its microbatch, the backward frees it); nodes that run no backward keep nothing. A node's
  figure is its own peak; a rank's total is the peak of the sum over its nodes.

**Compute**: forward matmul FLOPs per microbatch from the builders, times 3 for forward +
backward of a trained node (2 for a frozen node that passes gradients on, 1 without backward),
plus what recomputation repeats; per rank divided over TP x CP, each pipeline rank doing its own
stages, every DP replica its share of the batch. Ranks hosting the same stages form a group; the
slowest group sets the step. A builder without its own ``stage_costs`` gets ModelBuilder's
default (transformer layers from its TransformerConfig), and a warning naming the node.

**Batch**: a microbatch holds ``micro_batch_size x lcm(DP sizes)`` samples, so each DP rank of
the widest node runs ``micro_batch_size`` of them and a node of DP size ``d`` runs
``micro_batch_size x lcm / d``; each sample has the node's planned tokens (a language model's
full ``seq_length``, an encoder's patches or frames, edge-fed nodes what arrives).

**Items**: one item per sample on each encoder input, unless a ragged workload says otherwise
(:mod:`~mimo_builder._internal.planning.workload`): then the encoder's FLOPs scale by the mean
items per sample and its activations by the most, its downstream nodes' by the microbatch's
longest sample (the padding they run on); the backbone is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.kinds.contract import defines
from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.costs import StageCost
from mimo_builder._internal.planning.plan import NodePlan, Plan
from mimo_builder._internal.planning.workload import NodeItems, Workload

MEMORY_KEYS = ("params", "grads", "optimizer", "activations", "total")
UNBALANCED = 2.0  # slowest / fastest rank group above this gets a warning
FP32 = 4


@dataclass(frozen=True)
class Memory:
    """Bytes on one rank."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        """Bytes of parameters, gradients, optimizer state and activations together."""
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        """Each part and the total, in bytes, keyed as in MEMORY_KEYS."""
        return {key: getattr(self, key) for key in MEMORY_KEYS}


@dataclass(frozen=True)
class NodeEstimate:
    """One node's batch share and per-stage costs."""

    tokens: int
    """Tokens per sample the node computes on."""

    micro_batch: int
    """Samples per microbatch on each of its DP ranks."""

    stages: list[StageCost]
    """Per virtual stage, one microbatch (:meth:`ModelBuilder.stage_costs`)."""

    passes: int
    """Forward-equivalents per microbatch: 3 trained, 2 frozen with backward, 1 forward only."""

    flops_per_step: int
    """The whole node's FLOPs per step, every rank together."""

    items: NodeItems | None = None
    """The ragged items the node's work scales with (None: one item per sample)."""


@dataclass(frozen=True)
class RankGroup:
    """Ranks hosting the same stages, with the FLOPs each of them does per step."""

    ranks: list[int]
    stages: str
    flops_per_rank: int


@dataclass
class Estimates:
    """Memory and FLOPs of every rank of a plan, with the fit verdicts and warnings."""

    micro_batch_size: int
    num_microbatches: int
    global_microbatch: int
    gpu_memory: int | None
    nodes: dict[str, NodeEstimate]
    memory: list[Memory]
    node_memory: list[dict[str, Memory]]
    flops: list[int]
    groups: list[RankGroup]
    warnings: list[str]
    workload: Workload | None = None
    """The items per sample the estimates assume (None: one per sample)."""

    def fits(self, rank: int) -> bool | None:
        """Whether the rank's total fits ``gpu_memory`` (None without a limit)."""
        return None if self.gpu_memory is None else self.memory[rank].total <= self.gpu_memory

    @property
    def imbalance(self) -> float:
        """Slowest group's FLOPs per rank over the mean of the ranks that host something."""
        busy = [g for g in self.groups if g.stages]
        total = sum(g.flops_per_rank * len(g.ranks) for g in busy)
        count = sum(len(g.ranks) for g in busy)
        slowest = max((g.flops_per_rank for g in busy), default=0)
        return slowest / (total / count) if total else 1.0

    def node_dict(self, name: str, plan: Plan) -> dict:
        """A node's batch share, its FLOPs per step and its heaviest rank's memory."""
        node, layout = self.nodes[name], next(n.layout for n in plan.nodes if n.name == name)
        heaviest = max((self.node_memory[r][name] for r in layout.ranks), key=lambda m: m.total)
        return {"tokens": node.tokens, "micro_batch": node.micro_batch, "flops_per_step": node.flops_per_step,
                "memory_bytes": heaviest.as_dict(), "items": _items_dict(node.items),
                "stage_activation_bytes": [s.activation_bytes for s in node.stages]}

    def rank_dict(self, rank: int) -> dict:
        """A rank's memory in bytes (total and per node), whether it fits, and its FLOPs per step."""
        return {"memory_bytes": self.memory[rank].as_dict(), "fits": self.fits(rank),
                "flops_per_step": self.flops[rank],
                "node_memory_bytes": {n: m.as_dict() for n, m in self.node_memory[rank].items()}}

    def summary_dict(self) -> dict:
        """Plan-wide figures: batch sizes, GPU memory limit, imbalance, idle share and rank groups."""
        return {"micro_batch_size": self.micro_batch_size, "microbatches": self.num_microbatches,
                "samples_per_microbatch": self.global_microbatch, "gpu_memory_bytes": self.gpu_memory,
                "imbalance": round(self.imbalance, 4), "idle_share": round(1 - 1 / self.imbalance, 4),
                "items_per_sample": self.workload.as_dict() if self.workload else None,
                "rank_groups": [{"ranks": ranges(g.ranks), "stages": g.stages, "flops_per_rank": g.flops_per_rank}
                                for g in self.groups]}


def estimate_plan(plan: Plan, schedule, micro_batch_size: int = 1, gpu_memory: int | None = None,
                  gpu_memory_label: str | None = None, workload: Workload | None = None) -> Estimates | None:
    """Estimates for ``plan`` under ``schedule`` (its :func:`~mimo_builder._internal.runtime.pipeline.plan_graph`),
    with ``workload``'s items per sample (None: one); None when the plan has no parameter counts
    (``count_params=False``)."""
    from mimo_builder._internal.runtime.pipeline import needs_grad

    if any(n.transformer_config is None for n in plan.nodes):
        return None
    backward = needs_grad(plan.valid)
    samples = micro_batch_size * math.lcm(*(n.layout.dp for n in plan.nodes))
    arrivals = token_arrivals(plan.valid)
    items = workload.node_items(plan.valid) if workload else {}
    nodes = {n.name: _node_estimate(plan, n, samples, arrivals[n.name], backward[n.name], schedule.num_microbatches,
                                    items.get(n.name)) for n in plan.nodes}
    by_key: dict[tuple, tuple[dict[str, Memory], Memory, int]] = {}
    memory, node_memory, flops = [], [], []
    for rank in range(plan.world_size):
        key = tuple((n.name, c["pp"]) for n, c in plan.hosted(rank))
        if key not in by_key:
            by_key[key] = _rank_estimate(plan, nodes, rank, schedule)
        per_node, total, rank_flops = by_key[key]
        node_memory.append(per_node)
        memory.append(total)
        flops.append(rank_flops)
    groups = _groups(plan, flops)
    estimates = Estimates(micro_batch_size, schedule.num_microbatches, samples, gpu_memory, nodes, memory,
                          node_memory, flops, groups, [], workload if workload and workload.counts else None)
    estimates.warnings = _warnings(plan, estimates, gpu_memory_label)
    return estimates


def token_arrivals(valid) -> dict[str, dict[str, int]]:
    """Token counts arriving on each node's edge-fed ports, flowing along the edges from what each
    builder's ``output_tokens`` makes of its arrivals (as synthetic batches do)."""
    produced: dict[tuple[str, str], int] = {}
    arrivals = {}
    for name in valid.order:
        builder = valid.builders[name]
        arriving = {e.dst_port: produced[(e.src, e.src_port)] for e in valid.edges
                    if e.dst == name and (e.src, e.src_port) in produced}
        arrivals[name] = arriving
        try:
            lengths = builder.output_tokens(arriving)
        except (MimoError, KeyError):  # an output nobody's token axis depends on
            lengths = {}
        produced.update({(name, port): count for port, count in lengths.items() if count})
    return arrivals


def _node_estimate(plan: Plan, node: NodePlan, samples: int, arriving: dict[str, int], backward: bool,
                   num_microbatches: int, items: NodeItems | None) -> NodeEstimate:
    micro_batch = samples // node.layout.dp
    builder = plan.valid.builders[node.name]
    if items is None:
        stages = builder.stage_costs(node.transformer_config, micro_batch, arriving)
    else:
        stages = items.stage_costs(builder, node.transformer_config, micro_batch, arriving)
    count = costs.passes(backward, node.frozen)
    return NodeEstimate(builder.planned_tokens(arriving), micro_batch, stages, count,
                        costs.step_flops(stages, count, num_microbatches, node.layout.dp), items)


def _items_dict(items: NodeItems | None) -> dict | None:
    """A node's items for ``plan --json``: its key, whether it runs them flat, the factors."""
    if items is None:
        return None
    return {"key": items.key, "encoder": items.encoder, "mean": items.counts.mean, "max": items.counts.largest}


def _param_bytes(node: NodePlan, plan: Plan) -> tuple[int, float, float]:
    """Bytes per parameter on a rank of ``node``: (parameter, gradient, optimizer state)."""
    param = torch.empty((), dtype=node.transformer_config.params_dtype).element_size()
    if node.frozen:
        return param, 0, 0
    ddp = plan.valid.ddp_config(node.name)
    grad = FP32 if ddp.grad_reduce_in_fp32 else param
    settings = plan.valid.optimizer_settings(node.name)
    if settings.optimizer == "adam":
        state = 2 * FP32
    else:
        state = FP32 if settings.mcore.get("sgd_momentum", 0.9) else 0
    half = param < FP32
    optimizer = state + (FP32 if half else 0) + (FP32 if half and grad < FP32 else 0)
    if ddp.use_distributed_optimizer:
        optimizer /= node.layout.dp * node.layout.cp
    return param, grad, optimizer


def _rank_estimate(plan: Plan, nodes: dict[str, NodeEstimate], rank: int, schedule):
    """(memory per hosted node, the rank's memory, the rank's FLOPs per step)."""
    hosted = plan.hosted(rank)
    own_peak, total_peak = _activation_peaks(nodes, schedule.order.get(rank, []))
    per_node, flops = {}, 0
    for node, coords in hosted:
        count, trained = node.stage_params[coords["pp"]], node.stage_trainable[coords["pp"]]
        param, grad, optimizer = _param_bytes(node, plan)
        per_node[node.name] = Memory(count * param, int(trained * grad), int(trained * optimizer),
                                     own_peak.get(node.name, 0))
        flops += _rank_flops(nodes[node.name], node, coords["pp"], schedule.num_microbatches)
    total = Memory(sum(m.params for m in per_node.values()), sum(m.grads for m in per_node.values()),
                   sum(m.optimizer for m in per_node.values()), total_peak)
    return per_node, total, flops


def _rank_flops(estimate: NodeEstimate, node: NodePlan, pp_rank: int, num_microbatches: int) -> int:
    layout = node.layout
    mine = [s for k, s in enumerate(estimate.stages) if k % layout.pp == pp_rank]
    return costs.step_flops(mine, estimate.passes, num_microbatches, 1) // (layout.tp * layout.cp)


def _activation_peaks(nodes: dict[str, NodeEstimate], ops) -> tuple[dict[str, int], int]:
    """Each node's peak and the rank's peak of activation bytes along its operations."""
    live: dict[str, int] = {}
    own: dict[str, int] = {}
    peak = 0
    for op in ops:
        estimate = nodes[op.stage.node]
        if estimate.passes == 1:
            continue
        size = estimate.stages[op.stage.index].activation_bytes
        live[op.stage.node] = live.get(op.stage.node, 0) + (size if op.kind == "F" else -size)
        own[op.stage.node] = max(own.get(op.stage.node, 0), live[op.stage.node])
        peak = max(peak, sum(live.values()))
    return own, peak


def _groups(plan: Plan, flops: list[int]) -> list[RankGroup]:
    groups: dict[str, RankGroup] = {}
    for rank in range(plan.world_size):
        stages = ", ".join(f"{n.name}:pp{c['pp']}" for n, c in plan.hosted(rank))
        group = groups.setdefault(f"{stages}|{flops[rank]}", RankGroup([], stages, flops[rank]))
        group.ranks.append(rank)
    return list(groups.values())


def _default_cost_warnings(plan: Plan, est: Estimates) -> list[str]:
    """One per node whose builder does not override ``stage_costs``: its costs are ModelBuilder's
    guess (``num_layers`` transformer layers of its TransformerConfig), whatever its layers are."""
    out = []
    for node in plan.nodes:
        if defines(plan.valid.builders[node.name], "stage_costs"):
            continue
        config, tokens = node.transformer_config, est.nodes[node.name].tokens
        out.append(f"node '{node.name}' (builder '{node.builder}'): no stage_costs(); its FLOPs and activations "
                   f"assume {_count(config.num_layers, 'transformer layer')} of hidden {config.hidden_size} "
                   f"on {_count(tokens, 'token')} per sample "
                   "(ModelBuilder's default); define stage_costs(self, config, micro_batch, tokens) for its "
                   "real layers (docs/extending.md)")
    return out


def _count(number: int, noun: str) -> str:
    """'1 token', '2,048 tokens'."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _warnings(plan: Plan, est: Estimates, gpu_memory_label: str | None) -> list[str]:
    out = _default_cost_warnings(plan, est)
    idle = [r for g in est.groups if not g.stages for r in g.ranks]
    if idle:
        out.append(f"{len(idle)} of {plan.world_size} ranks host no node and idle every step: {ranges(idle)}")
    busy = [g for g in est.groups if g.stages]
    if len(busy) > 1:
        slow = max(busy, key=lambda g: g.flops_per_rank)
        fast = min(busy, key=lambda g: g.flops_per_rank)
        if slow.flops_per_rank > UNBALANCED * max(fast.flops_per_rank, 1):
            out.append(f"unbalanced placement: ranks {ranges(slow.ranks)} do {format_flops(slow.flops_per_rank)} "
                       f"per step each, ranks {ranges(fast.ranks)} {format_flops(fast.flops_per_rank)} "
                       f"({slow.flops_per_rank / max(fast.flops_per_rank, 1):.1f}x); the slowest group sets the "
                       f"step: max/mean {est.imbalance:.2f}, {1 - 1 / est.imbalance:.0%} of the ranks' time idle")
    if est.gpu_memory is not None:
        over = [r for r in range(plan.world_size) if not est.fits(r)]
        if over:
            runs = _runs(over, lambda r: est.memory[r].total)
            shown = "; ".join(f"{ranges(g)} ({format_bytes(est.memory[g[0]].total)})" for g in runs[:8])
            shown += f"; and {len(runs) - 8} more" if len(runs) > 8 else ""
            out.append(f"{len(over)} ranks do not fit in {gpu_memory_label or format_bytes(est.gpu_memory)}: {shown}")
    return out


def _runs(ranks: list[int], key) -> list[list[int]]:
    """Consecutive ranks with the same ``key`` value, as lists."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and runs[-1][-1] == r - 1 and key(runs[-1][-1]) == key(r):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def ranges(ranks: list[int]) -> str:
    """'0-3, 8' for [0, 1, 2, 3, 8]."""
    return ", ".join(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in _runs(ranks, lambda r: 0))


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB', '80 GiB', '512MB', '80e9' -> bytes (decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB).
    Raises ValueError for anything else or a size that is not positive."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = stripped[len(number):].strip()
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 80GiB, 512MB, 80e9)") from None
    if not (value >= 1 and math.isfinite(value)):
        raise ValueError(f"memory size must be at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(value: float) -> str:
    """Decimal units, three significant digits: '1.23 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{int(value)} B"


def format_flops(value: float, unit: str = "FLOP") -> str:
    """Decimal prefixes, three significant digits: '1.32 GFLOP' (``unit=""``: '1.32 G')."""
    for prefix, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {prefix}{unit}"
    return f"{int(value)} {unit}".rstrip()
