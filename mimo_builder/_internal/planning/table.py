"""Render a dry-run Plan as rich tables: one row per node, then ranks (grouped when many)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mimo_builder._internal.planning.estimate import Estimates, format_bytes, format_flops
from mimo_builder._internal.planning.plan import Plan

PER_RANK_ROWS = 32  # above this many ranks, consecutive ranks with the same hosting are merged


def print_plan(plan: Plan, console: Console | None = None, num_microbatches: int = 1, schedule=None,
               estimates: Estimates | None = None) -> None:
    """Nodes, ranks (with memory and FLOPs when ``estimates`` are given), groups and schedule."""
    console = console or Console()
    schedule = schedule or pipeline_plan(plan, num_microbatches)
    console.print(nodes_table(plan, estimates))
    for n in plan.nodes:
        if n.trainable_params is not None and n.trainable_params != n.params and not n.frozen:
            console.print(f"LoRA: node '{n.name}' trains {n.trainable_params:,} of its {n.params:,} parameters "
                          f"({n.trainable_params / n.params:.1%}); the rest is frozen", highlight=False)
    console.print(ranks_table(plan))
    if estimates is not None:
        console.print(estimates_table(plan, estimates))
        for line in estimate_lines(estimates):
            console.print(line, highlight=False)
    console.print(f"process groups to create: {plan.num_groups:,} (every rank takes part in each)")
    console.print(schedule_table(plan, schedule.num_microbatches, schedule))


def estimate_lines(est: Estimates) -> list[str]:
    """What the estimates assume, the compute balance and the warnings."""
    lines = [f"memory (state: weights + grads + optimizer; activations: at the peak of the schedule below) "
             f"and FLOPs for {est.global_microbatch} samples per microbatch (micro-batch size "
             f"{est.micro_batch_size} on the widest node's DP ranks), {est.num_microbatches} microbatches per step; "
             "per DP rank and microbatch: " + ", ".join(f"{name} {node.micro_batch} x {node.tokens:,} tokens"
                                                        for name, node in est.nodes.items())]
    if est.workload is not None:
        lines.append(f"items ({est.workload.source}): " + "; ".join(
            node.items.describe(name, node.micro_batch) for name, node in est.nodes.items() if node.items))
    busy = [g for g in est.groups if g.stages]
    if len(busy) > 1:
        lines.append(f"compute: {len(busy)} rank groups, slowest/mean {est.imbalance:.2f} "
                     f"({1 - 1 / est.imbalance:.0%} of the busy ranks' time idle waiting for the slowest)")
    lines += [f"[yellow]warning:[/yellow] {w}" for w in est.warnings]
    return lines


def schedule_table(plan: Plan, num_microbatches: int, schedule=None) -> Table:
    """The pipeline every rank runs: its stages, forwards before its first backward, idle share."""
    schedule = schedule or pipeline_plan(plan, num_microbatches)
    table = Table(title=f"Schedule: {len(schedule.stages)} stages, {num_microbatches} microbatches, "
                        f"1F1B over the whole graph ({schedule.makespan:g} slots)")
    for column in ("ranks", "stages (node:virtual stage)", "warm-up forwards", "idle (simulated)"):
        table.add_column(column, justify="left" if column.startswith("stages") else "right")
    for first, last, stages, warmup, idle in _schedule_rows(plan, schedule):
        table.add_row(str(first) if first == last else f"{first}-{last}", stages, str(warmup), f"{idle:.0%}")
    if schedule.batched:
        table.caption = f"batched (one forward and one backward over every microbatch): {', '.join(sorted(schedule.batched))}"
    return table


def pipeline_plan(plan: Plan, num_microbatches: int, memory: int | None = None, workload=None):
    """The graph-wide pipeline schedule of ``plan`` for ``num_microbatches`` (:func:`plan_graph`),
    encoders batched where the runtime would (:mod:`~mimo_builder._internal.runtime.batching`; with
    ``memory`` bytes per rank, where the estimate under ``workload``'s items fits them)."""
    from mimo_builder._internal.runtime.batching import batched_nodes
    from mimo_builder._internal.runtime.pipeline import plan_graph

    batched = batched_nodes(plan.valid, num_microbatches, memory=memory, plan=plan, workload=workload)
    return plan_graph(plan.valid, num_microbatches, batched=batched)


def _schedule_rows(plan: Plan, schedule):
    rows = []
    for rank in range(plan.world_size):
        stages = sorted({(op.stage.node, op.stage.index) for op in schedule.order.get(rank, [])},
                        key=lambda s: (plan.valid.order.index(s[0]), s[1]))
        key = (", ".join(f"{n}:{i}" for n, i in stages) or "-", schedule.warmup(rank),
               round(schedule.idle_fraction(rank), 2))
        if rows and tuple(rows[-1][2:]) == key:
            rows[-1][1] = rank
        else:
            rows.append([rank, rank, *key])
    return rows


def nodes_table(plan: Plan, estimates: Estimates | None = None) -> Table:
    """One row per node: builder, rank span, tp/cp/pp/dp/ep, parameters, and FLOPs per step with ``estimates``."""
    table = Table(title=f"Graph plan on {plan.world_size} ranks")
    extra = ("FLOP/step",) if estimates else ()
    for column in ("node", "builder", "ranks", "tp", "cp", "pp", "dp", "ep", "params", *extra):
        left = column in ("node", "builder")
        table.add_column(column, justify="left" if left else "right", no_wrap=not left)
    for n in plan.nodes:
        lay = n.layout
        name, params = f"{n.name} (frozen)" if n.frozen else n.name, _count(n.params)
        if n.trainable_params is not None and n.trainable_params != n.params and not n.frozen:
            name = f"{n.name} (LoRA)"
        values = ()
        if estimates:
            node = estimates.nodes[n.name]
            values = (format_flops(node.flops_per_step, unit=""),)
        table.add_row(name, n.builder, f"{lay.offset}-{lay.offset + lay.size - 1}", str(lay.tp), str(lay.cp),
                      str(lay.pp), str(lay.dp), str(lay.ep), params, *values)
    return table


def ranks_table(plan: Plan) -> Table:
    """One row per rank (equal neighbours merged in large worlds): nodes hosted, coordinates, parameters."""
    table = Table(title="Per rank")
    table.add_column("ranks", justify="right", no_wrap=True)
    table.add_column("nodes (tp, cp, dp, pp coordinates)")
    table.add_column("params on rank", justify="right", no_wrap=True)
    for first, last, text, params in _merged_rows(plan, lambda rank: _hosting_cells(plan, rank)):
        table.add_row(_span(first, last), text, _count(params))
    return table


def estimates_table(plan: Plan, estimates: Estimates) -> Table:
    """Memory (state = weights + grads + optimizer; activations at the schedule's peak), the
    fit verdict when a GPU size is given, and FLOPs per step, per rank."""
    table = Table(title="Memory and compute per rank")
    fit = ("fits",) if estimates.gpu_memory is not None else ()
    for column in ("ranks", "state", "activations", "total", *fit, "FLOP/step"):
        table.add_column(column, justify="right", no_wrap=True)
    for first, last, *cells in _merged_rows(plan, lambda rank: _estimate_cells(estimates, rank)):
        table.add_row(_span(first, last), *cells)
    return table


def _hosting_cells(plan: Plan, rank: int) -> tuple:
    detailed = plan.world_size <= PER_RANK_ROWS
    hosted = plan.hosted(rank)
    if detailed:
        text = ", ".join(f"{n.name} ({c['tp']},{c['cp']},{c['dp']},{c['pp']}){_expert_rank(n.layout, rank)}"
                         for n, c in hosted)
    else:
        text = ", ".join(f"{n.name} pp{c['pp']}" for n, c in hosted)
    return text or "-", plan.rank_params(rank)


def _expert_rank(layout, rank: int) -> str:
    """`` ep<i>``: the rank's expert-parallel coordinate on a node with ep > 1 (else nothing)."""
    return f" ep{layout.expert_coords(rank)['ep']}" if layout.ep > 1 else ""


def _estimate_cells(estimates: Estimates, rank: int) -> tuple[str, ...]:
    m = estimates.memory[rank]
    fit = estimates.fits(rank)
    cells = [format_bytes(m.params + m.grads + m.optimizer), format_bytes(m.activations), format_bytes(m.total)]
    if fit is not None:
        cells.append("yes" if fit else "[red]NO[/red]")
    return (*cells, format_flops(estimates.flops[rank], unit=""))


def _merged_rows(plan: Plan, cells):
    """Rows of (first, last, *cells(rank)); consecutive equal rows merged when the world is large."""
    detailed = plan.world_size <= PER_RANK_ROWS
    rows = []
    for rank in range(plan.world_size):
        key = tuple(cells(rank))
        if rows and not detailed and tuple(rows[-1][2:]) == key:
            rows[-1][1] = rank
        else:
            rows.append([rank, rank, *key])
    return rows


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
