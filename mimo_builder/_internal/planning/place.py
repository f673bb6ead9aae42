"""``mimo-builder place``: search placements of a graph on a world and rank them by predicted step time.

Candidates (every one validated as a document, and only at TP sizes the cost table measured):

- **colocated**: every node on every rank, all at one TP size (a node that cannot split so at tp=1);
- **disjoint**: the nodes that feed others (encoders, projectors) on the first ranks, the nodes the
  graph's outputs read (the backbone) on the rest, each side at its own TP size, the backbone
  also at pp=2 where its layers split;
- **mixed**: each chain of feeding nodes (an encoder and its projector) on its own ranks.

Ranks split between groups in every way for small worlds; from 8 ranks on, in eighths of the
world. Each candidate runs at every microbatch count the batch splits into (1 to 16). Each is
predicted from measured costs (:mod:`~mimo_builder._internal.planning.predict`), under a ragged
workload's items per sample where given (:mod:`~mimo_builder._internal.planning.workload`); with a
memory limit the best are checked against the plan's memory estimate until ``top`` fit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.errors import GraphError, MimoError
from mimo_builder._internal.planning.cost_table import CostTable
from mimo_builder._internal.planning.predict import Prediction, predict_step
from mimo_builder._internal.planning.workload import Workload

MICROBATCHES = (1, 2, 4, 8, 16)


@dataclass
class Candidate:
    """One placement of the graph and its predicted step."""

    label: str
    graph: Graph
    microbatches: int
    prediction: Prediction
    memory: int | None = None
    high: float | None = None
    """The predicted step with every node at the slow end of its measured spread."""
    valid: object = field(default=None, repr=False)

    @property
    def interval(self) -> tuple[float, float]:
        """The predicted step at the median costs and at the slow end of the measured range."""
        return self.prediction.step, max(self.prediction.step, self.high or 0.0)

    @property
    def simplicity(self) -> tuple:
        """Smaller is simpler: colocated before disjoint before mixed, then fewer pipeline stages,
        a smaller TP size and fewer microbatches."""
        placements = [node.placement for node in self.graph.nodes.values()]
        shape = ("colocated", "disjoint", "mixed").index(self.label.split()[0])
        return shape, max(p.pp for p in placements), max(p.tp for p in placements), self.microbatches

    @property
    def busiest_idle(self) -> float:
        """The idle share of the rank that waits most."""
        return max(self.prediction.idle.values(), default=0.0)


@dataclass
class Rejections:
    """Why candidates were left out: per cause, how many and the first one's details."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, cause: str, example: str) -> None:
        """Count one candidate left out for ``cause``."""
        self.counts[cause] = self.counts.get(cause, 0) + 1
        self.examples.setdefault(cause, example)

    def lines(self) -> list[str]:
        """One line per cause, the most frequent first."""
        causes = sorted(self.counts, key=lambda c: -self.counts[c])
        return [f"{self.counts[c]} {c}, e.g. {self.examples[c]}" for c in causes]


def search(graph: Graph, world_size: int, costs: CostTable, batch_size: int, memory: int | None = None,
           top: int = 5, rejected: Rejections | None = None,
           workload: Workload | None = None) -> tuple[list[Candidate], int]:
    """The ``top`` candidates by predicted step time (fitting ``memory`` bytes per rank where
    given) under ``workload``'s items per sample (None: one), and how many candidates were
    predicted; ``rejected`` collects why the others were not."""
    from mimo_builder._internal.runtime.batching import batched_nodes
    from mimo_builder._internal.runtime.batch import split_problems
    from mimo_builder._internal.validation import validate_graph

    ranked, seen, rejected = [], 0, rejected if rejected is not None else Rejections()
    for label, placed in _placements(graph, world_size, costs):
        try:
            valid = validate_graph(placed, world_size)
        except MimoError as err:
            rejected.add("placement(s) do not validate", f"{label}: {_first(err)}")
            continue
        for m in MICROBATCHES:
            split = split_problems(valid, batch_size, m)
            if split:
                rejected.add(f"(placement, M) pair(s) do not split a batch of {batch_size}",
                             f"{label}, M={m}: {split[0]}")
                continue
            seen += 1
            try:
                prediction = predict_step(valid, costs, m, batch_size, batched_nodes(valid, m), workload)
            except MimoError as err:  # a node at a TP size the table lacks
                rejected.add("(placement, M) pair(s) lack measured costs", f"{label}, M={m}: {err}")
                continue
            ranked.append(Candidate(label, placed, m, prediction, valid=valid))
    ranked.sort(key=lambda c: (c.prediction.step, c.label, c.microbatches))
    kept = _fitting(ranked, world_size, memory, top, rejected, workload)
    slow = costs.slowed()
    for c in kept:
        c.high = predict_step(c.valid, slow, c.microbatches, batch_size, c.prediction.plan.batched, workload).step
    return kept, seen


def pick(ranked: list[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The placement to run, and the candidates it cannot be told from (:func:`indistinct`); among
    those, the simplest."""
    tied = [c for c in ranked if c is ranked[0] or indistinct(ranked[0], c)]
    return min(tied, key=lambda c: c.simplicity), tied


def indistinct(fastest: Candidate, other: Candidate) -> bool:
    """Whether the measurements cannot tell ``other`` from ``fastest``: predicted within 1% of it,
    or no slower at the slow end of the measured range. Both predictions come from the same node
    costs, so their ranges overlapping is not enough: what matters is whether their order holds
    wherever in its range each node's cost lies (checked at the two ends)."""
    close = other.prediction.step <= fastest.prediction.step * 1.01
    return close or other.interval[1] <= fastest.interval[1]


def _first(err: MimoError) -> str:
    return err.problems[0] if isinstance(err, GraphError) else str(err)


def _fitting(ranked: list[Candidate], world_size: int, memory: int | None, top: int,
             rejected: Rejections, workload: Workload | None = None) -> list[Candidate]:
    """The first ``top`` candidates whose plan estimate fits ``memory`` (all, without a limit)."""
    if memory is None:
        return ranked[:top]
    from mimo_builder._internal.planning.estimate import estimate_plan, format_bytes
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.runtime.pipeline import plan_graph

    kept = []
    for candidate in ranked:
        plan = make_plan(candidate.graph, world_size)
        estimate = estimate_plan(plan, plan_graph(plan.valid, candidate.microbatches,
                                                  batched=candidate.prediction.plan.batched), 1, memory,
                                workload=workload)
        candidate.memory = max(m.total for m in estimate.memory)
        if candidate.memory <= memory:
            kept.append(candidate)
            if len(kept) == top:
                break
        else:
            rejected.add(f"(placement, M) pair(s) exceed --gpu-memory {format_bytes(memory)} per rank",
                         f"{candidate.label}, M={candidate.microbatches}: {format_bytes(candidate.memory)}")
    return kept


def no_placement(world_size: int, batch_size: int, costs: CostTable, rejected: Rejections) -> str:
    """Why no candidate is left, cause by cause (for the error ``place`` raises)."""
    tps = sorted({tp for per_node in costs.nodes.values() for tp in per_node})
    lines = rejected.lines() or [f"no candidate shape: a measured TP size ({', '.join(map(str, tps))}) must divide "
                                 f"the {world_size} ranks (colocated) or each group's ranks (split placements); "
                                 "profile at other TP sizes or place on another world size"]
    return (f"no placement of the graph on {world_size} ranks runs {batch_size} samples per step at the measured "
            "TP sizes:\n" + "\n".join(f"  - {line}" for line in lines))


def _placements(graph: Graph, world_size: int, costs: CostTable):
    """(label, graph with placements) for every candidate shape."""
    sinks, chains = _roles(graph)
    tps = sorted({tp for per_node in costs.nodes.values() for tp in per_node})
    for tp in tps:
        if world_size % tp == 0:
            yield f"colocated tp={tp} dp={world_size // tp}", _placed(graph, {n: (0, world_size, tp, 1)
                                                                             for n in graph.nodes})
    if not chains or not sinks:
        return
    feeders = [n for chain in chains for n in chain]
    for groups in (1, len(chains)) if len(chains) > 1 else (1,):
        for sizes in _splits(world_size, groups + 1):
            yield from _split_candidates(graph, feeders, chains, sinks, sizes, groups, tps)


def _split_candidates(graph, feeders, chains, sinks, sizes, groups, tps):
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    sets = [feeders] if groups == 1 else chains
    kind = "disjoint" if groups == 1 else "mixed"
    for tp_feed, tp_sink, pp in itertools.product(tps, tps, (1, 2)):
        if any(size % tp_feed for size in sizes[:-1]) or sizes[-1] % (tp_sink * pp):
            continue
        where = {}
        for names, offset, size in zip(sets, offsets, sizes):
            where.update({n: (offset, size, tp_feed, 1) for n in names})
        where.update({n: (offsets[-1], sizes[-1], tp_sink, pp) for n in sinks})
        label = (f"{kind} {'+'.join(map(str, sizes))}: feeders tp={tp_feed}, "
                 f"backbone tp={tp_sink}{f' pp={pp}' if pp > 1 else ''}")
        yield label, _placed(graph, where)


def _placed(graph: Graph, where: dict[str, tuple[int, int, int, int]]) -> Graph:
    placed = graph.model_copy(deep=True)
    for name, (offset, size, tp, pp) in where.items():
        placed.nodes[name].placement = Placement(offset=offset, size=size, tp=tp, pp=pp)
    return placed


def _roles(graph: Graph) -> tuple[list[str], list[list[str]]]:
    """The nodes the outputs read (the backbone side) and the chains of nodes that feed them."""
    from mimo_builder._internal.document.graph import parse_edge, parse_port_ref

    sinks = sorted({parse_port_ref(ref)[0] for ref in graph.outputs})
    edges = [(parse_edge(e)[0][0], parse_edge(e)[1][0]) for e in graph.edges]
    feeders = [n for n in graph.nodes if n not in sinks]
    chains: list[list[str]] = []
    for name in feeders:  # join a node to the chain of the node feeding it
        source = next((c for c in chains for src, dst in edges if dst == name and src in c), None)
        if source is None:
            chains.append([name])
        else:
            source.append(name)
    return sinks, chains


def _splits(world_size: int, parts: int):
    """Group sizes summing to the world: every composition for small worlds, eighths from 8 on."""
    unit = world_size // 8 if world_size >= 8 and world_size % 8 == 0 else 1
    total = world_size // unit
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [(b - a) * unit for a, b in zip(bounds, bounds[1:])]


def rank_groups(valid) -> list[tuple[str, list[int]]]:
    """Ranks grouped by the nodes they host."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for rank in range(valid.world_size):
        groups.setdefault(tuple(n for n in valid.order if rank in valid.layouts[n].ranks), []).append(rank)
    return [(", ".join(nodes), ranks) for nodes, ranks in groups.items()]


def reason(best: Candidate, others: list[Candidate]) -> str:
    """Why ``best`` won, against the next candidate of another shape."""
    rival = next((c for c in others if c.label != best.label), None)
    if rival is None:
        return "the only candidate"
    gain = rival.prediction.step / best.prediction.step - 1
    return (f"{gain:.0%} faster than the next shape ({rival.label}, M={rival.microbatches}); its busiest rank "
            f"idles {best.busiest_idle:.0%} of the step against {rival.busiest_idle:.0%}")
