"""One pipeline over the whole graph: which forward and backward each rank runs, in which order.

Every node is cut into its (virtual) pipeline stages: virtual stage ``k`` of a node with
``pp`` ranks and ``vp`` chunks is chunk ``k // pp`` on pipeline rank ``k % pp``, as in MCore's
interleaved schedule. The stages form one DAG: a node's stages in a chain, and each graph edge
from the producer's last stage to the consumer's first. A stage runs on every rank of its
node with that pipeline coordinate (its "gang": all DP, TP and CP ranks move together).

:func:`plan_pipeline` simulates the step once, identically on every rank, with unit costs
(forward 1, backward 2): an operation starts when its inputs are done and all its ranks are
free, backwards first, then the lowest microbatch. A stage keeps at most as many microbatches in
flight as the longest chain of stages from it to the end of the graph (MCore's 1F1B warm-up:
``pp - p`` on pipeline rank ``p``). Each rank then runs its operations in simulated order. That
order is deadlock-free with non-blocking sends: every input of an operation was produced by an
operation that started earlier, and collectives inside a stage's gang happen at one simulated
time on all its ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.placement import Layout

FORWARD, BACKWARD = "F", "B"
COST = {FORWARD: 1.0, BACKWARD: 2.0}


class PipelineError(MimoError, RuntimeError):
    """The stage graph could not be scheduled (a bug: every DAG should be)."""


@dataclass(frozen=True, order=True)
class Stage:
    """Virtual pipeline stage ``index`` of ``node``: model chunk ``chunk`` on pipeline rank ``pp_rank``."""

    node: str
    index: int
    chunk: int
    pp_rank: int
    last: bool


@dataclass(frozen=True)
class Op:
    """A forward or backward of one stage for one microbatch. A batched stage runs all
    ``span`` microbatches at once: its ops share one start and one end."""

    kind: str
    stage: Stage
    microbatch: int
    start: float = field(default=0.0, compare=False)
    span: int = field(default=1, compare=False)
    duration: float | None = field(default=None, compare=False)
    """Simulated seconds of the op's run where costs were measured (None: unit costs)."""

    @property
    def end(self) -> float:
        """When the simulated run this op belongs to ends."""
        return self.start + (COST[self.kind] * self.span if self.duration is None else self.duration)


@dataclass
class PipelinePlan:
    """The simulated step: stages, their links, and every rank's operations in order."""

    stages: list[Stage]
    preds: dict[Stage, list[Stage]]
    succs: dict[Stage, list[Stage]]
    ranks: dict[Stage, tuple[int, ...]]
    order: dict[int, list[Op]]
    in_flight: dict[Stage, int]
    num_microbatches: int
    makespan: float
    batched: frozenset[str] = frozenset()
    """Nodes run once over every microbatch (:mod:`~mimo_builder._internal.runtime.batching`)."""

    def warmup(self, rank: int) -> int:
        """Forwards this rank runs before its first backward."""
        ops = self.order.get(rank, [])
        first_backward = next((i for i, op in enumerate(ops) if op.kind == BACKWARD), len(ops))
        return sum(1 for op in ops[:first_backward] if op.kind == FORWARD)

    def idle_fraction(self, rank: int) -> float:
        """Share of the simulated step this rank waits (unit costs)."""
        busy = sum(COST[op.kind] for op in self.order.get(rank, []))
        return 1.0 - busy / self.makespan if self.makespan else 0.0


def plan_graph(valid, num_microbatches: int, max_in_flight: int | None = None,
               batched: frozenset[str] = frozenset(), timing=None) -> PipelinePlan:
    """:func:`plan_pipeline` for a validated graph placed on a world (``valid.layouts`` set)."""
    vp = {name: virtual_stages(valid.configs[name]) for name in valid.order}
    backward = {name for name, needed in needs_grad(valid).items() if needed}
    return plan_pipeline(valid.order, [(e.src, e.dst) for e in valid.edges], valid.layouts, vp, backward,
                         num_microbatches, max_in_flight, batched, timing)


def virtual_stages(config) -> int:
    """Virtual pipeline chunks per pipeline rank a node's config asks for (1 without VP)."""
    options = getattr(config, "transformer", None) or {}
    return options.get("virtual_pipeline_model_parallel_size") or 1


def needs_grad(valid) -> dict[str, bool]:
    """A node runs backward if it trains or feeds on a node that does."""
    out = {}
    for name in valid.order:
        upstream = any(out[e.src] for e in valid.edges if e.dst == name)
        out[name] = upstream or not valid.graph.nodes[name].frozen
    return out


def node_stages(name: str, layout: Layout, vp: int) -> list[Stage]:
    """The virtual stages of one node, in layer order."""
    count = layout.pp * vp
    return [Stage(name, k, k // layout.pp, k % layout.pp, k == count - 1) for k in range(count)]


def stage_ranks(stage: Stage, layout: Layout) -> tuple[int, ...]:
    """Every rank of the node at the stage's pipeline coordinate."""
    return tuple(r for r in layout.ranks if layout.coords(r)["pp"] == stage.pp_rank)


def plan_pipeline(order: list[str], edges: list[tuple[str, str]], layouts: dict[str, Layout],
                  vp: dict[str, int], backward: set[str], num_microbatches: int,
                  max_in_flight: int | None = None, batched: frozenset[str] = frozenset(),
                  timing=None) -> PipelinePlan:
    """Simulate one step of ``num_microbatches`` over the stage DAG of a graph.

    ``order`` is the nodes' topological order, ``edges`` (producer, consumer) node pairs,
    ``backward`` the nodes that run a backward pass. ``max_in_flight`` caps every stage's
    microbatches in flight further (1: one microbatch at a time through the whole graph, the
    sequential schedule, least activation memory). ``batched`` nodes (one stage each, see
    :func:`~mimo_builder._internal.runtime.batching.batched_nodes`) run every microbatch in one forward,
    once all their inputs are there, and one backward, once all their consumers' are done.
    ``timing`` (:class:`~mimo_builder._internal.planning.predict.MeasuredTiming`) replaces the unit costs by
    seconds: ``op_seconds(kind, stage, span)`` and ``transfer_seconds(producer, consumer)``.
    """
    by_node = {name: node_stages(name, layouts[name], vp.get(name, 1)) for name in order}
    stages = [s for name in order for s in by_node[name]]
    preds: dict[Stage, list[Stage]] = {s: [] for s in stages}
    for chain in by_node.values():
        for a, b in zip(chain, chain[1:]):
            preds[b].append(a)
    for src, dst in sorted(set(edges)):
        preds[by_node[dst][0]].append(by_node[src][-1])
    succs: dict[Stage, list[Stage]] = {s: [] for s in stages}
    for s, ps in preds.items():
        for p in ps:
            succs[p].append(s)
    ranks = {s: stage_ranks(s, layouts[s.node]) for s in stages}
    in_flight = _in_flight_limits(stages, succs)
    if max_in_flight is not None:
        in_flight = {s: min(n, max_in_flight) for s, n in in_flight.items()}
    in_flight.update({s: num_microbatches for s in stages if s.node in batched})
    sim = _Simulation(stages, preds, succs, ranks, in_flight, {s for s in stages if s.node in backward},
                      num_microbatches, {s for s in stages if s.node in batched}, timing)
    return PipelinePlan(stages, preds, succs, ranks, sim.run(), in_flight, num_microbatches, sim.makespan,
                        frozenset(batched))


def _in_flight_limits(stages: list[Stage], succs: dict[Stage, list[Stage]]) -> dict[Stage, int]:
    """Longest chain of stages from each stage to a sink, itself included."""
    depth: dict[Stage, int] = {}
    for s in reversed(stages):  # stages are in topological order
        depth[s] = 1 + max((depth[q] for q in succs[s]), default=0)
    return depth


class _Simulation:
    """List scheduling of every (stage, microbatch) forward and backward on the ranks."""

    def __init__(self, stages, preds, succs, ranks, limits, backward, num_microbatches, batched=frozenset(),
                 timing=None):
        self.stages, self.preds, self.succs, self.ranks = stages, preds, succs, ranks
        self.position = {s: i for i, s in enumerate(stages)}  # tie-break: graph order
        self.limits, self.backward, self.m, self.batched = limits, backward, num_microbatches, batched
        self.timing = timing
        self.done: dict[tuple[str, Stage, int], float] = {}
        self.free: dict[int, float] = defaultdict(float)
        self.next = {(kind, s): 0 for s in stages for kind in (FORWARD, BACKWARD)}
        self.order: dict[int, list[Op]] = defaultdict(list)
        self.makespan = 0.0

    def run(self) -> dict[int, list[Op]]:
        total = sum(self.m * (2 if s in self.backward else 1) for s in self.stages)
        while sum(self.next.values()) < total:
            candidates = [c for s in self.stages for c in self._candidates(s, capped=True)]
            if not candidates:  # cannot happen for a DAG with these caps; stay safe anyway
                candidates = [c for s in self.stages for c in self._candidates(s, capped=False)]
            if not candidates:
                raise PipelineError("no operation is ready: the stage graph has a cycle")
            start, _, _, _, op = min(candidates, key=lambda c: c[:4])
            if op.stage in self.batched:
                for m in range(self.m):
                    self._commit(self._timed(Op(op.kind, op.stage, m, start, span=self.m)))
            else:
                self._commit(self._timed(Op(op.kind, op.stage, op.microbatch, start)))
        return dict(self.order)

    def _candidates(self, s: Stage, capped: bool):
        if s in self.batched:
            yield from self._batched_candidates(s)
            return
        index = self.position[s]
        m = self.next[(FORWARD, s)]
        started_backward = self.next[(BACKWARD, s)]
        cap_ok = not capped or s not in self.backward or m - started_backward < self.limits[s]
        if m < self.m and cap_ok and all((FORWARD, p, m) in self.done for p in self.preds[s]):
            ready = max((self.done[(FORWARD, p, m)] + self._delay(p, s) for p in self.preds[s]), default=0.0)
            yield self._start(s, ready), 1, m, index, Op(FORWARD, s, m)
        m = started_backward
        if s in self.backward and (FORWARD, s, m) in self.done:
            after = [q for q in self.succs[s] if q in self.backward]
            if all((BACKWARD, q, m) in self.done for q in after):
                ready = max([self.done[(FORWARD, s, m)], *(self.done[(BACKWARD, q, m)] + self._delay(q, s)
                                                           for q in after)])
                yield self._start(s, ready), 0, m, index, Op(BACKWARD, s, m)

    def _batched_candidates(self, s: Stage):
        """A batched stage's forward of every microbatch once all its inputs are there; its
        backward once every consumer's backward of every microbatch is done."""
        index, last = self.position[s], self.m - 1
        if self.next[(FORWARD, s)] == 0 and all((FORWARD, p, last) in self.done for p in self.preds[s]):
            ready = max((self.done[(FORWARD, p, m)] + self._delay(p, s) for p in self.preds[s] for m in range(self.m)),
                        default=0.0)
            yield self._start(s, ready), 1, 0, index, Op(FORWARD, s, 0)
        after = [q for q in self.succs[s] if q in self.backward]
        if (s in self.backward and self.next[(BACKWARD, s)] == 0 and (FORWARD, s, last) in self.done
                and all((BACKWARD, q, m) in self.done for q in after for m in range(self.m))):
            ready = max([self.done[(FORWARD, s, last)], *(self.done[(BACKWARD, q, m)] + self._delay(q, s)
                                                          for q in after for m in range(self.m))])
            yield self._start(s, ready), 0, 0, index, Op(BACKWARD, s, 0)

    def _delay(self, producer: Stage, consumer: Stage) -> float:
        """Seconds a message takes from one stage to the next (0 with unit costs)."""
        return 0.0 if self.timing is None else self.timing.transfer_seconds(producer, consumer)

    def _timed(self, op: Op) -> Op:
        if self.timing is None:
            return op
        return Op(op.kind, op.stage, op.microbatch, op.start, op.span,
                  self.timing.op_seconds(op.kind, op.stage, op.span))

    def _start(self, s: Stage, ready: float) -> float:
        return max([ready, *(self.free[r] for r in self.ranks[s])])

    def _commit(self, op: Op) -> None:
        end = op.end
        for r in self.ranks[op.stage]:
            self.free[r] = end
            self.order[r].append(op)
        self.done[(op.kind, op.stage, op.microbatch)] = end
        self.next[(op.kind, op.stage)] += 1
        self.makespan = max(self.makespan, end)
