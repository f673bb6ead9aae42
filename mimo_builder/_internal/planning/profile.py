"""``mimo-builder profile``: measure a graph's costs on this machine into a :class:`CostTable`.

Every run uses as many ranks as the world being planned has, up to the machine's devices (GPUs,
or CPU cores so that every rank has its own), so that every device is busy as in the run the
costs are for (on this 2-core CPU a rank alone ran 20-28% faster than two side by side). For
each tensor-parallel size a search would consider here (1, 2, 4, 8 up to those ranks), the graph
runs colocated, every node at that tp where it can be split so (else at tp=1), data-parallel over
the rest, for a few steps of synthetic batches at two batch sizes (on CPU with the intra-op
threads a rank of the target world gets: the cores over the world size); the schedule's phase
timer gives each node's forward, backward and optimizer seconds (the slowest rank's; the
gradient reduction apart), fitted per node as ``fixed + per_row * rows``. On two ranks a
ping-pong of two message sizes gives the link's latency and bandwidth; the tp=1 run's step time
beyond its nodes' compute gives the runtime's own time per operation and per step.

Each run is repeated in ``rounds`` (fresh processes; the rounds interleave, so a slow spell of the
machine falls on one round of every run rather than on every round of one). A run's seconds are
the mean of its fastest quarter of timed steps (on a shared host, memory-bound steps slow down by
up to 1.5x for seconds at a time), and a cost the median of its rounds (whole processes differ by
up to 1.7x). How much slower the slowest round ran is kept per node as its ``spread``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import torch

from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.planning.cost_table import CostTable, Linear, LinkCosts, NodeCosts, describe_machine

PROFILE_TPS = (1, 2, 4, 8)
MESSAGE_SIZES = (1 << 10, 1 << 20)
SPLIT = 4  # the second microbatch count of the document's batch
STEPS, ROUNDS = 12, 3
FASTEST = 0.25  # the share of a run's timed steps its seconds come from: the undisturbed ones


def _ranks(world_size: int) -> int:
    """The ranks every profile run uses: the world, up to the devices (GPUs, else CPU cores)."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    return max(1, min(world_size, devices))


def tp_sizes(world_size: int) -> list[int]:
    """The TP sizes to profile: those dividing the ranks a profile run uses."""
    ranks = _ranks(world_size)
    return [t for t in PROFILE_TPS if t <= ranks and ranks % t == 0]


def profile_graph(graph: Graph, world_size: int, batch_size: int = 8, steps: int = STEPS, rounds: int = ROUNDS,
                  progress=None) -> CostTable:
    """Measure ``graph``'s nodes on this machine (see the module); ``progress(done, total, what)``
    is called before each run."""
    from mimo_builder._internal.kinds.registry import allowed_prefixes
    from mimo_builder._internal.platform.launch import launch

    ranks = _ranks(world_size)
    runs = [(t, size) for t in tp_sizes(world_size) for size in _batch_sizes(ranks, batch_size)]
    threads = max(1, (os.cpu_count() or 1) // world_size)  # what each rank of a world this size gets
    table = CostTable(machine=describe_machine("cuda" if torch.cuda.is_available() else "cpu"))
    table.machine.update(ranks=ranks, threads_per_rank=threads, rounds=rounds, steps=steps)
    found = _Found(_ops_per_microbatch(graph), ranks)
    for done, (round_, (t, size)) in enumerate(itertools.product(range(rounds), runs)):
        if progress is not None:
            progress(done, rounds * len(runs), f"tp={t}, {size} samples per step, round {round_ + 1} of {rounds}")
        placed, tps = _colocated(graph, t, ranks)
        counts = (1, SPLIT) if size == max(s for _, s in runs) and size % (SPLIT * ranks) == 0 else (1,)
        per_rank = launch(_measure, ranks, placed.as_dict(), size, steps, allowed_prefixes(), counts, threads,
                          timeout_s=900)
        found.add(round_, per_rank, tps, t, size)
    if progress is not None:
        progress(rounds * len(runs), rounds * len(runs), "done")
    return found.into(table)


class _Found:
    """What the runs measured, by round: each node's (rows, seconds) points per phase, the
    runtime's own seconds, the link."""

    def __init__(self, ops: int, ranks: int):
        self.ops, self.ranks = ops, ranks
        self.points: dict[tuple[str, int], dict[str, dict[float, list[float]]]] = {}
        self.totals: dict[tuple[str, int], dict[tuple[int, int, int], float]] = {}  # by (round, tp, size)
        self.per_op: list[float] = []
        self.per_step: list[float] = []
        self.links: list[tuple[LinkCosts, LinkCosts]] = []

    def add(self, round_: int, per_rank: list[dict], tps: dict[str, int], tp: int, size: int) -> None:
        """One run of the graph colocated at ``tp`` (each node at ``tps``), ``size`` samples per step."""
        _collect(self.points, per_rank, tps, size)
        for name, node_tp in tps.items():  # the node's calls per round: how far rounds differ
            seconds = max(sum(r["nodes"].get(name, {}).get(p, 0.0) for p in ("forward", "backward")) for r in per_rank)
            self.totals.setdefault((name, node_tp), {})[(round_, tp, size)] = seconds
        if len(per_rank[0]["runs"]) == 2:  # the same batch in more microbatches: what each further operation costs
            if tp == 1:
                self.per_op.append(_per_op(per_rank[0], self.ops))
                self.per_step.append(_per_step(per_rank, self._per_op() * self.ops))
        if per_rank[0]["link"] is not None:
            self.links.append(per_rank[0]["link"])

    def _per_op(self) -> float:
        return statistics.median(self.per_op) if self.per_op else 0.0

    def into(self, table: CostTable) -> CostTable:
        """``table`` with the median round of every point and of the runtime's own seconds, the
        fastest link, and each node's spread over the rounds."""
        table.overhead_per_op = self._per_op()
        table.overhead_per_step = {self.ranks: statistics.median(self.per_step)} if self.per_step else {}
        if self.links:
            table.link, table.allreduce = (_fastest([link[i] for link in self.links]) for i in (0, 1))
        for (name, tp), phases in self.points.items():
            median = {phase: [(rows, statistics.median(seconds)) for rows, seconds in by_rows.items()]
                      for phase, by_rows in phases.items()}
            params = int(max(s for _, s in median["params"]))
            reduced = table.allreduce_seconds(self.ranks // tp, params * 4)  # fp32 gradients
            table.nodes.setdefault(name, {})[tp] = NodeCosts(
                forward=Linear.fit(median["forward"]), backward=Linear.fit(median["backward"]),
                communication=Linear.fit(median["communication"]),
                optimizer=min(s for _, s in median["optimizer"]), params=params,
                reduction=max(min(s for _, s in median["reduction"]) - reduced, 0.0),
                spread=_spread(self.totals.get((name, tp), {})))
        return table


def _spread(totals: dict[tuple[int, int, int], float]) -> float:
    """How much slower than the median round the slowest round ran (the median over runs)."""
    spreads = []
    for run in {key[1:] for key in totals}:
        seconds = sorted(v for key, v in totals.items() if key[1:] == run)
        if len(seconds) > 1 and statistics.median(seconds) > 0:
            spreads.append(seconds[-1] / statistics.median(seconds) - 1)
    return statistics.median(spreads) if spreads else 0.0


def _fastest(links: list[LinkCosts]) -> LinkCosts:
    return LinkCosts(latency=min(l.latency for l in links), seconds_per_byte=min(l.seconds_per_byte for l in links))


def _batch_sizes(ranks: int, batch_size: int) -> list[int]:
    """Two global batch sizes: one sample per rank, and the document's batch (whole samples per rank)."""
    return sorted({ranks, max(ranks, batch_size - batch_size % ranks)})


def _colocated(graph: Graph, tp: int, ranks: int) -> tuple[Graph, dict[str, int]]:
    """``graph`` on ``ranks`` ranks, each node at tp=``tp`` where that validates, else tp=1."""
    from mimo_builder._internal.errors import MimoError
    from mimo_builder._internal.validation import validate_graph

    placed, tps = graph.model_copy(deep=True), {}
    for name in graph.nodes:
        placed.nodes[name].placement = Placement()
    for name in graph.nodes:
        trial = placed.model_copy(deep=True)
        trial.nodes[name].placement = Placement(tp=tp)
        try:
            validate_graph(trial, ranks)
            placed.nodes[name].placement, tps[name] = Placement(tp=tp), tp
        except MimoError:
            tps[name] = 1
    return placed, tps


def _collect(points, per_rank: list[dict], tps: dict[str, int], size: int) -> None:
    """Each node's seconds per phase and rows (samples a rank runs in one call) from the slowest
    rank, appended to the rounds already there."""
    for name, tp in tps.items():
        rows = size * tp / len(per_rank)  # the node's share of the batch on one data-parallel rank
        found = points.setdefault((name, tp), {p: {} for p in ("forward", "backward", "communication",
                                                                "optimizer", "reduction", "params")})

        def add(phase: str, rows: float, seconds: float) -> None:
            found[phase].setdefault(rows, []).append(seconds)

        phases = [r["nodes"].get(name, {}) for r in per_rank]
        for phase in ("forward", "backward", "communication"):
            add(phase, rows, max(p.get(phase, 0.0) for p in phases))  # one microbatch per step
            for m in per_rank[0]["runs"]:  # more microbatches: more, smaller calls
                if m > 1:
                    calls = 1 if name in per_rank[0]["batched"].get(m, ()) else m
                    seconds = max(r["runs"][m]["nodes"].get(name, {}).get(phase, 0.0) for r in per_rank)
                    add(phase, rows * calls / m, seconds / calls)
        add("optimizer", rows, max(p.get("optimizer", 0.0) for p in phases))
        add("reduction", rows, max(p.get("reduction", 0.0) for p in phases))
        add("params", rows, max(r["params"].get(name, 0) for r in per_rank))


def _ops_per_microbatch(graph: Graph) -> int:
    """Forwards and backwards of one microbatch of the graph colocated (one stage per node)."""
    from mimo_builder._internal.runtime.pipeline import needs_grad
    from mimo_builder._internal.validation import validate_graph

    return sum(2 if backward else 1 for backward in needs_grad(validate_graph(graph)).values())


def _per_op(measured: dict, ops: int) -> float:
    """The runtime's own seconds per operation: what more microbatches add to the one-rank step
    beyond its nodes' phases, per operation they add (``ops`` per microbatch)."""
    runs = measured["runs"]
    beyond = [runs[m]["wall"] - sum(sum(p.values()) for p in runs[m]["nodes"].values()) for m in (1, SPLIT)]
    return max(beyond[1] - beyond[0], 0.0) / ((SPLIT - 1) * ops)


def _per_step(per_rank: list[dict], operations: float) -> float:
    """The step's own seconds on this many ranks: beyond the slowest rank's phases and the
    ``operations``' own seconds (the loss and gradient-norm collectives, the step's checks)."""
    phases = max(sum(sum(p.values()) for p in r["runs"][1]["nodes"].values()) for r in per_rank)
    wall = max(r["runs"][1]["wall"] for r in per_rank)
    return max(wall - phases - operations, 0.0)


def _measure(document: dict, size: int, steps: int, allowed: tuple[str, ...], counts: tuple[int, ...] = (1,),
             threads: int | None = None) -> dict:
    """On every rank: build ``document``, time ``steps`` steps after a warm-up at each microbatch
    count of ``counts``; this rank's seconds per node and phase and of its step (:func:`timed_steps`) (at one
    microbatch, and per count under ``runs``), its parameters per node, and (rank 0 of two or
    more) the link."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.kinds.registry import allow_modules
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.runtime.timing import PhaseTimer

    allow_modules(*allowed)
    device = compat.init_runtime("auto")
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    (model,) = CompositeBuilder(Graph.from_dict(document)).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    with model:
        timer = PhaseTimer(device)
        schedule, optimizer = GraphSchedule(model, device=device, timer=timer), GraphOptimizer(model, timer=timer)
        batch = synthetic_batch(model.valid, size)
        runs = {m: timed_steps(schedule, optimizer, timer, batch, m, steps) for m in counts}
        batched = {m: sorted(schedule.plan(m).batched) for m in counts}
        params = {n: sum(p.numel() for c in model.chunks(n) for p in c.parameters())
                  for n in model.valid.order if model.hosts(n)}
        link = _ping_pong(device) if dist.get_world_size() >= 2 else None
    return {**runs[1], "runs": runs, "batched": batched, "params": params, "link": link}


def timed_steps(schedule, optimizer, timer, batch, microbatches: int, steps: int) -> dict:
    """Seconds per node and phase (``nodes``, from ``timer``; the optimizer's gradient reduction as
    ``reduction``, apart from the forward's ``communication``) and of the whole step (``wall``):
    the mean over the fastest quarter of ``steps`` training steps after a warm-up."""
    import torch.distributed as dist

    samples, walls = [], []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        result = schedule.forward_backward(batch, microbatches)
        seconds = timer.take()
        optimizer.step(result)
        walls.append(time.perf_counter() - start)
        for (name, phase), value in timer.take().items():  # the gradient reduction is a phase of its own
            key = (name, "reduction" if phase == "communication" else phase)
            seconds[key] = seconds.get(key, 0.0) + value
        samples.append(seconds)
    return fastest_steps(walls[1:], samples[1:])  # the first step compiles and warms caches


def fastest_steps(walls: list[float], samples: list[dict[tuple[str, str], float]]) -> dict:
    """The mean wall time (``wall``) and seconds per node and phase (``nodes``) of the fastest
    quarter of the steps (at least one): the steps a slow spell of the machine left alone."""
    kept = sorted(range(len(walls)), key=walls.__getitem__)[:max(1, round(len(walls) * FASTEST))]
    nodes: dict[str, dict[str, float]] = {}
    for name, phase in sorted({key for sample in samples for key in sample}):
        nodes.setdefault(name, {})[phase] = statistics.fmean(samples[i].get((name, phase), 0.0) for i in kept)
    return {"nodes": nodes, "wall": statistics.fmean(walls[i] for i in kept)}


def _ping_pong(device, rounds: int = 10) -> tuple[LinkCosts, LinkCosts] | None:
    """Ranks 0 and 1 bounce messages of two sizes, and every rank all-reduces them: the one-way
    message and the all-reduce as latency and seconds per byte (on rank 0)."""
    import torch.distributed as dist

    rank, one_way, reduced = dist.get_rank(), [], []
    for size in MESSAGE_SIZES:
        buffer = torch.zeros(size // 4, dtype=torch.float32, device=device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds if rank < 2 else 0):
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
        one_way.append((time.perf_counter() - start) / (2 * rounds))
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            dist.all_reduce(buffer)
        reduced.append((time.perf_counter() - start) / rounds)
    return (_line(one_way), _line(reduced)) if rank == 0 else None


def _line(seconds: list[float]) -> LinkCosts:
    """Latency and seconds per byte through the two message sizes' times."""
    per_byte = max((seconds[1] - seconds[0]) / (MESSAGE_SIZES[1] - MESSAGE_SIZES[0]), 0.0)
    return LinkCosts(latency=max(seconds[0] - per_byte * MESSAGE_SIZES[0], 0.0), seconds_per_byte=per_byte)
