"""Render a dry-run Plan as rich tables: one row per node, then ranks (grouped when many)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mimo_builder.plan import Plan

PER_RANK_ROWS = 32  # above this many ranks, consecutive ranks with the same hosting are merged


def print_plan(plan: Plan, console: Console | None = None, num_microbatches: int = 1) -> None:
    console = console or Console()
    console.print(nodes_table(plan))
    console.print(ranks_table(plan))
    console.print(f"process groups to create: {plan.num_groups:,} (every rank takes part in each)")
    console.print(schedule_table(plan, num_microbatches))


def schedule_table(plan: Plan, num_microbatches: int) -> Table:
    """The pipeline every rank runs: its stages, forwards before its first backward, idle share."""
    schedule = pipeline_plan(plan, num_microbatches)
    table = Table(title=f"Schedule: {len(schedule.stages)} stages, {num_microbatches} microbatches, "
                        f"1F1B over the whole graph ({schedule.makespan:g} slots)")
    for column in ("ranks", "stages (node:virtual stage)", "warm-up forwards", "idle (simulated)"):
        table.add_column(column, justify="left" if column.startswith("stages") else "right")
    for first, last, stages, warmup, idle in _schedule_rows(plan, schedule):
        table.add_row(str(first) if first == last else f"{first}-{last}", stages, str(warmup), f"{idle:.0%}")
    return table


def pipeline_plan(plan: Plan, num_microbatches: int):
    from mimo_builder.runtime.pipeline import plan_graph

    return plan_graph(plan.valid, num_microbatches)


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


def nodes_table(plan: Plan) -> Table:
    table = Table(title=f"Graph plan on {plan.world_size} ranks")
    for column in ("node", "builder", "ranks", "tp", "cp", "pp", "dp", "ep", "params"):
        table.add_column(column, justify="right" if column not in ("node", "builder") else "left")
    for n in plan.nodes:
        lay = n.layout
        name = f"{n.name} (frozen)" if n.frozen else n.name
        table.add_row(name, n.builder, f"{lay.offset}-{lay.offset + lay.size - 1}", str(lay.tp), str(lay.cp),
                      str(lay.pp), str(lay.dp), str(lay.ep), _count(n.params))
    return table


def ranks_table(plan: Plan) -> Table:
    table = Table(title="Per rank")
    table.add_column("ranks", justify="right")
    table.add_column("nodes (tp, cp, dp, pp coordinates)")
    table.add_column("params on rank", justify="right")
    for first, last, text, params in _rank_rows(plan):
        table.add_row(str(first) if first == last else f"{first}-{last}", text, _count(params))
    return table


def _rank_rows(plan: Plan):
    """Rows of (first, last, nodes text, params); merged ranges when the world is large."""
    detailed = plan.world_size <= PER_RANK_ROWS
    rows = []
    for rank in range(plan.world_size):
        hosted = plan.hosted(rank)
        if detailed:
            text = ", ".join(f"{n.name} ({c['tp']},{c['cp']},{c['dp']},{c['pp']})" for n, c in hosted)
        else:
            text = ", ".join(f"{n.name} pp{c['pp']}" for n, c in hosted)
        key = (text or "-", plan.rank_params(rank))
        if rows and not detailed and (rows[-1][2], rows[-1][3]) == key:
            rows[-1][1] = rank
        else:
            rows.append([rank, rank, *key])
    return rows


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
