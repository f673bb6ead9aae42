"""Each node's throughput and model FLOPs utilisation (MFU), for the run log and TensorBoard.

A graph is heterogeneous: its nodes have their own ranks, shapes and dtypes, so one MFU over the
world hides which node wastes its GPUs. Per node and step (``T``: the step's wall time):

- model FLOPs ``F``: what the plan counts (:func:`mimo_builder._internal.kinds.costs.step_flops`), the
  builder's ``stage_costs`` forward matmul FLOPs per microbatch x 3 for a trained node (2 frozen
  with backward, 1 without) + recomputation, over the step's microbatches and DP replicas, with
  the node's planned tokens per sample (a language model's full ``seq_length``). The node that
  reads ``input_ids`` counts the step's own tokens instead (every ``input_ids`` slot, or the
  samples' tokens when packed), its FLOPs scaled linearly from the planned ones;
- ``TFLOP/s per rank = F / (R x T)`` over the node's ``R`` ranks;
- ``MFU = F / (R x T x P)`` with ``P`` the peak of one device for the node's dtype
  (:mod:`mimo_builder._internal.platform.peak`, or ``--peak-tflops``);
- ``tokens/s``: the node's tokens per sample x samples per step / ``T``.

Colocated nodes share their ranks' time, so their MFUs add up to the ranks' MFU. The whole graph:
``sum(F / P) / (world x T)``. A builder without its own ``stage_costs`` has no FLOP count here
(the plan's default would be a guess), only tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mimo_builder._internal.kinds import costs
from mimo_builder._internal.kinds.contract import defines
from mimo_builder._internal.platform.peak import TERA, device_name, device_peak_flops
from mimo_builder._internal.runtime.pipeline import needs_grad
from mimo_builder._internal.runtime.timing import gather_to_first


@dataclass(frozen=True)
class NodeWork:
    """A node's work per training step, the same on every rank that hosts it."""

    ranks: int
    tokens: int
    """Tokens per step: planned tokens per sample x samples per step."""
    flops: int | None
    """Model FLOPs per step, every rank together (None: the builder does not count them)."""
    peak: float | None
    """Peak FLOP/s of one of its devices for its dtype (None: unknown, no MFU)."""
    reads_tokens: bool = False
    """Whether it reads the batch's ``input_ids`` (its count follows the step's tokens)."""

    def at(self, tokens: int | None) -> "NodeWork":
        """This work for a step of ``tokens`` batch tokens (its own count when it reads none)."""
        if not self.reads_tokens or not tokens:
            return self
        scale = tokens / self.tokens
        return replace(self, tokens=tokens, flops=None if self.flops is None else round(self.flops * scale))


@dataclass(frozen=True)
class NodeRate:
    """A node's throughput over some steps."""

    tokens_per_s: float
    tflops_per_rank: float | None
    mfu: float | None


def graph_work(model, batch_size: int, num_microbatches: int, device: torch.device,
               peak_tflops: float | None = None) -> dict[str, NodeWork] | None:
    """Every node's work, in graph order, on rank 0 (None on the other ranks). A collective over
    the graph's control group: each rank counts the nodes it hosts. ``peak_tflops`` overrides the
    device table."""
    from mimo_builder._internal.planning.estimate import token_arrivals  # planning imports the runtime's pipeline

    valid = model.valid
    arrivals, backward = token_arrivals(valid), needs_grad(valid)
    name = device_name(device)
    reader = valid.graph.inputs.get("input_ids", "").split(".")[0]
    mine = {}
    for node in (n for n in valid.order if model.hosts(n)):
        builder, layout = valid.builders[node], valid.layouts[node]
        config = builder.transformer_config(model.pg_collection(node))
        micro_batch = batch_size // num_microbatches // layout.dp
        flops = None
        if defines(builder, "stage_costs"):
            stages = builder.stage_costs(config, micro_batch, arrivals[node])
            passes = costs.passes(backward[node], valid.graph.nodes[node].frozen)
            flops = costs.step_flops(stages, passes, num_microbatches, layout.dp)
        peak = peak_tflops * TERA if peak_tflops else device_peak_flops(name, config.params_dtype)
        mine[node] = NodeWork(layout.size, builder.planned_tokens(arrivals[node]) * batch_size, flops, peak,
                              node == reader)
    gathered = gather_to_first(mine, model.control)
    if gathered is None:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    return {node: merged[node] for node in valid.order if node in merged}


def node_rates(work: dict[str, NodeWork], seconds: float, tokens: int | None = None) -> dict[str, NodeRate]:
    """Each node's rates when a step of ``tokens`` batch tokens takes ``seconds``."""
    rates = {}
    for node, w in work.items():
        w = w.at(tokens)
        per_rank = None if w.flops is None else w.flops / (w.ranks * seconds)
        mfu = None if per_rank is None or w.peak is None else per_rank / w.peak
        rates[node] = NodeRate(w.tokens / seconds, None if per_rank is None else per_rank / TERA, mfu)
    return rates


def graph_mfu(work: dict[str, NodeWork], world_size: int, seconds: float, tokens: int | None = None) -> float | None:
    """The whole graph's MFU: each node's FLOPs at its own peak, over every rank's time (None
    when a node's FLOPs or peak is unknown)."""
    counted = [w.at(tokens) for w in work.values()]
    if not counted or any(w.flops is None or w.peak is None for w in counted):
        return None
    return sum(w.flops / w.peak for w in counted) / (world_size * seconds)


def throughput_line(work: dict[str, NodeWork], world_size: int, seconds: float, tokens: int | None = None) -> str:
    """The run log's line: the graph's MFU where known, then per node FLOP/s per rank, MFU and tokens/s."""
    parts = []
    for node, rate in node_rates(work, seconds, tokens).items():
        shown = [] if rate.tflops_per_rank is None else [f"{_flops(rate.tflops_per_rank)}/rank"]
        shown += [] if rate.mfu is None else [f"MFU {rate.mfu:.1%}"]
        parts.append(f"{node} {', '.join(shown + [f'{rate.tokens_per_s:,.0f} tokens/s'])}")
    total = graph_mfu(work, world_size, seconds, tokens)
    head = "    throughput" + ("" if total is None else f" (MFU {total:.1%})")
    return f"{head}: " + " | ".join(parts)


def _flops(tflops: float) -> str:
    """'312 TFLOP/s', '19.4 GFLOP/s'."""
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"
