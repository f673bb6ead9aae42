"""``mimo-builder profile``: measure a graph's costs on this machine into a :class:`CostTable`.

For each tensor-parallel size a search would consider here (1, 2, 4, 8 up to the world size and
the machine's devices: GPUs, or CPU cores so that every rank has its own), the graph runs
colocated on that many ranks, every node at that tp where it can be split so (else at tp=1,
data-parallel over the ranks), for a few steps of synthetic batches at two batch sizes (on CPU
with the intra-op threads a rank of the target world gets: the cores over the world size); the
schedule's phase timer gives each node's forward, backward and optimizer seconds (the slowest
rank's), fitted per node as ``fixed + per_row * rows``. On two ranks a ping-pong of two message
sizes gives the link's latency and bandwidth; the one-rank run's step time beyond its nodes'
compute gives the runtime's own time per operation.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.planning.cost_table import CostTable, Linear, LinkCosts, NodeCosts, describe_machine

PROFILE_TPS = (1, 2, 4, 8)
MESSAGE_SIZES = (1 << 10, 1 << 20)
SPLIT = 4  # the second microbatch count of the document's batch


def tp_sizes(world_size: int) -> list[int]:
    """The TP sizes to profile: up to the world and to the devices (GPUs, else CPU cores)."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    return [t for t in PROFILE_TPS if t <= min(world_size, devices)]


def profile_graph(graph: Graph, world_size: int, batch_size: int = 8, steps: int = 5, progress=None) -> CostTable:
    """Measure ``graph``'s nodes on this machine (see the module); ``progress(done, total, what)``
    is called before each run."""
    from mimo_builder._internal.kinds.registry import allowed_prefixes
    from mimo_builder._internal.platform.launch import launch

    runs = [(t, size) for t in tp_sizes(world_size) for size in _batch_sizes(t, batch_size)]
    ops = _ops_per_microbatch(graph)
    points: dict[tuple[str, int], dict[str, list]] = {}
    table = CostTable(machine=describe_machine("cuda" if torch.cuda.is_available() else "cpu"))
    threads = max(1, (os.cpu_count() or 1) // world_size)  # what each rank of a world this size gets
    table.machine["threads_per_rank"] = threads
    for done, (t, size) in enumerate(runs):
        if progress is not None:
            progress(done, len(runs), f"tp={t}, {size} samples per step")
        placed, tps = _colocated(graph, t)
        counts = (1, SPLIT) if size == max(s for tt, s in runs if tt == t) and size % (SPLIT * t) == 0 else (1,)
        per_rank = launch(_measure, t, placed.as_dict(), size, steps, allowed_prefixes(), counts, threads,
                          timeout_s=900)
        _collect(points, per_rank, tps, t, size)
        if len(counts) == 2:  # the same batch in more microbatches: what each further operation costs
            if t == 1:
                table.overhead_per_op = _per_op(per_rank[0], ops)
            table.overhead_per_step[t] = _per_step(per_rank, table.overhead_per_op * ops)
        if t == 2 and per_rank[0]["link"] is not None:
            table.link, table.allreduce = per_rank[0]["link"]
    if progress is not None:
        progress(len(runs), len(runs), "done")
    for (name, tp), found in points.items():
        table.nodes.setdefault(name, {})[tp] = NodeCosts(
            forward=Linear.fit(found["forward"]), backward=Linear.fit(found["backward"]),
            communication=Linear.fit(found["communication"]),
            optimizer=statistics.median(found["optimizer"]), params=max(found["params"]))
    return table


def _batch_sizes(tp: int, batch_size: int) -> list[int]:
    """Two global batch sizes: one sample per data-parallel rank, and the document's batch."""
    return sorted({tp, max(tp, batch_size - batch_size % tp)})


def _colocated(graph: Graph, tp: int) -> tuple[Graph, dict[str, int]]:
    """``graph`` on ``tp`` ranks, each node at tp=``tp`` where that validates, else tp=1."""
    from mimo_builder._internal.errors import MimoError
    from mimo_builder._internal.validation import validate_graph

    placed, tps = graph.model_copy(deep=True), {}
    for name in graph.nodes:
        placed.nodes[name].placement = Placement()
    for name in graph.nodes:
        trial = placed.model_copy(deep=True)
        trial.nodes[name].placement = Placement(tp=tp)
        try:
            validate_graph(trial, tp)
            placed.nodes[name].placement, tps[name] = Placement(tp=tp), tp
        except MimoError:
            tps[name] = 1
    return placed, tps


def _collect(points, per_rank: list[dict], tps: dict[str, int], ranks: int, size: int) -> None:
    """Each node's (rows, seconds) points from the slowest rank, for the nodes that run at the
    run's tp (data-parallel ones would mix their gradient reduction in)."""
    for name, tp in tps.items():
        if tp != ranks:
            continue
        rows = size  # samples a rank runs per call (dp=1, one microbatch per step)
        found = points.setdefault((name, tp), {"forward": [], "backward": [], "communication": [], "optimizer": [],
                                               "params": []})
        phases = [r["nodes"].get(name, {}) for r in per_rank]
        for phase in ("forward", "backward", "communication"):
            found[phase].append((rows, max(p.get(phase, 0.0) for p in phases)))
            for m in per_rank[0]["runs"]:  # more microbatches: more, smaller calls
                if m > 1:
                    calls = 1 if name in per_rank[0]["batched"].get(m, ()) else m
                    seconds = max(r["runs"][m]["nodes"].get(name, {}).get(phase, 0.0) for r in per_rank)
                    found[phase].append((rows * calls / m, seconds / calls))
        found["optimizer"].append(max(p.get("optimizer", 0.0) for p in phases))
        found["params"].append(max(r["params"].get(name, 0) for r in per_rank))


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
    count of ``counts``; this rank's median seconds per node and phase and of its step (at one
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
    """Median seconds per node and phase (``nodes``, from ``timer``), and of the whole step
    (``wall``), over ``steps`` training steps after a warm-up."""
    import torch.distributed as dist

    samples, walls = [], []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        optimizer.step(schedule.forward_backward(batch, microbatches))
        walls.append(time.perf_counter() - start)
        samples.append(timer.take())
    samples, walls = samples[1:], walls[1:]  # the first step compiles and warms caches
    nodes: dict[str, dict[str, float]] = {}
    for name, phase in samples[0]:
        nodes.setdefault(name, {})[phase] = statistics.median(s.get((name, phase), 0.0) for s in samples)
    return {"nodes": nodes, "wall": statistics.median(walls)}


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
