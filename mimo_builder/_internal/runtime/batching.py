"""Encoder batching: which nodes run every microbatch of a step in one forward and one backward.

In a colocated placement an encoder shares its ranks with the backbone it feeds. Interleaved
with the backbone microbatch by microbatch, it runs ``M`` small forwards and ``M`` small backwards
per step; batched, it runs one forward over all ``M`` microbatches before the backbone's first
and one backward after the backbone's last: fewer, larger calls (FlagScale's colocated MIMO does
the same). The samples, their order and every gradient are those of the interleaved step.

A node is batched when the step has several microbatches, the document leaves its
``batch_microbatches`` on (the default), it is one pipeline stage without context parallelism,
no graph output reads it, every rank of it also hosts a node downstream of it that the graph's
outputs read (the backbone, busy on those ranks all step: batching there costs no overlap),
every node feeding it is batched too, and its activations for all microbatches fit: on CUDA the plan's
estimate of the busiest rank, with this node's activations held for every microbatch, must stay
below the device's memory (on CPU the host's memory is taken to hold them).
"""

from __future__ import annotations

import torch

from mimo_builder._internal.runtime.pipeline import plan_graph, virtual_stages


def batched_nodes(valid, num_microbatches: int, device: torch.device | None = None,
                  memory: int | None = None, plan=None, workload=None) -> frozenset[str]:
    """The nodes of ``valid`` (placed on a world) that run batched over ``num_microbatches``: on a
    CUDA ``device``, or with ``memory`` bytes per rank, only if the plan's estimate fits (``plan``:
    the graph's dry-run plan where the caller has it; ``workload``: the items per sample it assumes)."""
    if num_microbatches < 2:
        return frozenset()
    read = {node for node, _ in valid.outputs}
    below = _descendants(valid)
    chosen: set[str] = set()
    for name in valid.order:
        layout, node = valid.layouts[name], valid.graph.nodes[name]
        feeding = {e.src for e in valid.edges if e.dst == name}
        sinks = below[name] & read  # the backbone: its ranks are busy for the whole step anyway
        hosts_below = set().union(*(valid.layouts[d].ranks for d in sinks)) if sinks else set()
        if (node.batch_microbatches and layout.pp == 1 and layout.cp == 1 and virtual_stages(valid.configs[name]) == 1
                and name not in read and set(layout.ranks) <= hosts_below and feeding <= chosen):
            chosen.add(name)
    if chosen and memory is None and device is not None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if chosen and memory is not None and not fits(valid, num_microbatches, frozenset(chosen), memory, plan, workload):
        return frozenset()
    return frozenset(chosen)


def _descendants(valid) -> dict[str, set[str]]:
    below: dict[str, set[str]] = {name: set() for name in valid.order}
    for name in reversed(valid.order):
        for edge in valid.edges:
            if edge.src == name:
                below[name] |= {edge.dst} | below[edge.dst]
    return below


def fits(valid, num_microbatches: int, batched: frozenset[str], memory: int, plan=None, workload=None) -> bool:
    """Whether the plan's busiest rank, holding the ``batched`` nodes' activations for every
    microbatch, stays within ``memory`` bytes (at one sample per microbatch row; a failed estimate
    says no)."""
    try:
        from mimo_builder._internal.planning.estimate import estimate_plan
        from mimo_builder._internal.planning.plan import make_plan

        plan = plan if plan is not None else make_plan(valid.graph, valid.world_size)
        estimate = estimate_plan(plan, plan_graph(valid, num_microbatches, batched=batched), 1, None,
                                 workload=workload)
        return max(m.total for m in estimate.memory) <= memory
    except Exception:  # the estimate is advice: without it, run interleaved
        return False
