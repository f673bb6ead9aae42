"""A step's time predicted from measured costs: the runtime's own schedule, simulated in seconds.

The pipeline plan the runtime executes (:func:`~mimo_builder._internal.runtime.pipeline.plan_graph`: 1F1B
over the whole graph, encoders batched where they qualify) is simulated with each operation's
measured seconds (:class:`MeasuredTiming`) instead of unit costs, and messages between different
ranks take the link's latency plus their bytes at its bandwidth. After the last operation every
rank reduces its nodes' gradients over their DP groups (the measured all-reduce, scaled as a ring) and
steps their optimizers; the step ends when the slowest rank does (the graph-wide gradient norm
joins them). What it ignores: overlap of the gradient reduction with the backward, contention of
ranks that share cores or links, TP collectives beyond what the profile measured at that size,
and memory effects of larger microbatches than profiled.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo_builder._internal.planning.cost_table import CostTable
from mimo_builder._internal.planning.workload import Workload
from mimo_builder._internal.runtime.pipeline import FORWARD, PipelinePlan, Stage, plan_graph, stage_ranks, virtual_stages

FP32 = 4


@dataclass
class Prediction:
    """Seconds of one training step and each rank's idle share."""

    step: float
    pipeline: float
    """When the last forward or backward ends."""
    idle: dict[int, float]
    plan: PipelinePlan


class MeasuredTiming:
    """Seconds of each operation and message of ``valid``'s step at ``batch_size`` samples in
    ``num_microbatches`` (the cost function :func:`plan_graph` takes). With a ``workload``, a
    node's rows are its one-item samples' worth: an encoder's samples times the mean items per
    sample (the profile measured one item per sample), a node below it its samples times the
    expected longest sample of its call (the padding it runs on); messages from them alike."""

    def __init__(self, valid, costs: CostTable, num_microbatches: int, batch_size: int,
                 workload: Workload | None = None):
        self.valid, self.costs = valid, costs
        samples = {n: batch_size / (num_microbatches * valid.layouts[n].dp) for n in valid.order}
        items = workload.node_items(valid) if workload else {}
        self.rows = {n: rows * (items[n].row_factor(rows) if n in items else 1) for n, rows in samples.items()}
        self.stages = {n: valid.layouts[n].pp * virtual_stages(valid.configs[n]) for n in valid.order}
        self.sample_bytes = _sample_bytes(valid, items, samples)
        self.per_microbatch = batch_size / num_microbatches

    def op_seconds(self, kind: str, stage: Stage, span: int) -> float:
        """A forward or backward of one stage over ``span`` microbatches at once."""
        node = self.costs.node(stage.node, self.valid.layouts[stage.node].tp)
        rows = self.rows[stage.node] * span
        seconds = (node.forward if kind == FORWARD else node.backward).at(rows) / self.stages[stage.node]
        if kind == FORWARD:  # its inputs arrive and are shared over the TP group
            seconds += node.communication.at(rows) / self.stages[stage.node]
        return seconds + self.costs.overhead_per_op * span

    def transfer_seconds(self, producer: Stage, consumer: Stage) -> float:
        """A message from ``producer`` to ``consumer``: none where they share their ranks."""
        layouts = self.valid.layouts
        if set(stage_ranks(producer, layouts[producer.node])) == set(stage_ranks(consumer, layouts[consumer.node])):
            return 0.0
        dp = max(layouts[producer.node].dp, layouts[consumer.node].dp)
        size = self.sample_bytes.get((producer.node, consumer.node), 0) * self.per_microbatch / dp
        return self.costs.link.seconds(size)


def predict_step(valid, costs: CostTable, num_microbatches: int, batch_size: int,
                 batched: frozenset[str] = frozenset(), workload: Workload | None = None) -> Prediction:
    """The predicted step of ``valid`` (placed on a world) from ``costs``, with ``workload``'s
    items per sample (None: one)."""
    timing = MeasuredTiming(valid, costs, num_microbatches, batch_size, workload)
    plan = plan_graph(valid, num_microbatches, batched=batched, timing=timing)
    ends, busy = {}, {}
    for rank, ops in plan.order.items():
        ends[rank] = max(op.end for op in ops)
        busy[rank] = sum(op.duration / op.span for op in ops)
    after = {r: sum(_update_seconds(valid, costs, n) for n in valid.order if r in valid.layouts[n].ranks)
             for r in range(valid.world_size)}
    pipeline = max(ends.values(), default=0.0)
    step = pipeline + max(after.values(), default=0.0) + costs.step_overhead(valid.world_size)
    idle = {r: 1.0 - (busy.get(r, 0.0) + after[r]) / step if step else 0.0 for r in range(valid.world_size)}
    return Prediction(step, pipeline, idle, plan)


def _update_seconds(valid, costs: CostTable, name: str) -> float:
    """A rank's gradient reduction (its measured fixed part, and a ring all-reduce over the node's
    DP group) and optimizer step."""
    layout = valid.layouts[name]
    if valid.graph.nodes[name].frozen:
        return 0.0
    node = costs.node(name, layout.tp)
    stages = layout.pp
    return (node.optimizer + node.reduction + costs.allreduce_seconds(layout.dp, node.params * FP32)) / stages


def _sample_bytes(valid, items: dict | None = None, samples: dict | None = None) -> dict[tuple[str, str], float]:
    """Bytes one sample moves over each edge (tokens x features x 4; fp32 upper bound); from a
    node with ``items``, its tokens padded to the expected longest of its ``samples``."""
    from mimo_builder._internal.planning.estimate import token_arrivals

    arrivals = token_arrivals(valid)
    out: dict[tuple[str, str], int] = {}
    for edge in valid.edges:
        port = valid.ports(edge.dst).inputs[edge.dst_port]
        tokens = arrivals.get(edge.dst, {}).get(edge.dst_port, 1) if "tokens" in port.dims else 1
        padded = items[edge.src].counts.expected_longest(max(1, round(samples[edge.src]))) \
            if items and edge.src in items else 1
        out[(edge.src, edge.dst)] = out.get((edge.src, edge.dst), 0) + tokens * padded * (port.features or 1) * FP32
    return out
