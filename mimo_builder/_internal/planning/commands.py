"""The measured-cost commands: ``profile``, ``place`` and what ``plan --costs`` adds to the plan."""

from __future__ import annotations

import sys
import time

from mimo_builder._internal.planning.cost_table import CostTable


def profile_command(graph, world_size: int, batch_size: int, output: str | None, rounds: int = 3) -> CostTable:
    """Measure ``graph`` on this machine (a progress bar on stderr); write the table to ``output``."""
    from rich.progress import Progress

    from mimo_builder._internal.planning.profile import profile_graph

    start = time.perf_counter()
    with Progress(transient=True, console=_stderr()) as bar:
        task = bar.add_task("profiling", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"profiling: {what}")

        table = profile_graph(graph, world_size, batch_size, rounds=rounds, progress=progress)
    if output:
        table.save(output)
    spread = max((c.spread for per_tp in table.nodes.values() for c in per_tp.values()), default=0.0)
    print(f"profiled {len(table.nodes)} nodes at tp {sorted({tp for n in table.nodes.values() for tp in n})} "
          f"on {table.machine.get('ranks', '?')} ranks, {rounds} round(s), in {time.perf_counter() - start:.1f} s "
          f"(rounds differ by up to {spread:.0%})" + (f"; wrote {output}" if output else ""), file=sys.stderr)
    return table


def prediction_lines(valid, costs: CostTable, num_microbatches: int, batch_size: int, batched,
                     workload=None) -> list[str]:
    """The predicted step and each rank group's idle share (``plan --costs``), under ``workload``'s
    items per sample (None: one)."""
    from mimo_builder._internal.planning.place import rank_groups
    from mimo_builder._internal.planning.predict import predict_step

    predicted = predict_step(valid, costs, num_microbatches, batch_size, batched, workload)
    slow = predict_step(valid, costs.slowed(), num_microbatches, batch_size, batched, workload).step
    where = costs.machine.get("gpu") or f"{costs.machine.get('device', '?')} on {costs.machine.get('host', '?')}"
    lines = [f"predicted step: {_step_range(predicted.step, slow)} for {batch_size} samples in {num_microbatches} "
             f"microbatches (costs measured on {where}; forward and backward until {predicted.pipeline * 1e3:.1f} ms)"]
    for nodes, ranks in rank_groups(valid):
        idle = max(predicted.idle[r] for r in ranks)
        lines.append(f"  ranks {_span(ranks)} ({nodes}): idle {idle:.0%} of the step")
    return lines


def place_command(graph, world_size: int, costs: CostTable, batch_size: int, memory: int | None,
                  top: int, output: str | None, workload=None) -> int:
    """Print the ``top`` placements by predicted step (under ``workload``'s items per sample);
    write the best as a document."""
    from rich.console import Console
    from rich.table import Table

    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.planning.place import Rejections, no_placement, pick, reason, search
    from mimo_builder._internal.validation import validate_graph

    start, rejected = time.perf_counter(), Rejections()
    ranked, seen = search(graph, world_size, costs, batch_size, memory, top, rejected, workload)
    seconds = time.perf_counter() - start
    if not ranked:
        raise ConfigError(no_placement(world_size, batch_size, costs, rejected))
    table = Table(title=f"Placements on {world_size} ranks, {batch_size} samples per step, by predicted step time")
    for column in ("#", "placement", "M", "step (spread)", "busiest idle", "memory/rank"):
        table.add_column(column, justify="left" if column == "placement" else "right")
    for i, c in enumerate(ranked, 1):
        table.add_row(str(i), c.label, str(c.microbatches), _step_range(*c.interval), f"{c.busiest_idle:.0%}",
                      "-" if c.memory is None else f"{c.memory / 2**20:,.0f} MiB")
    Console().print(table)
    if workload is not None and workload.counts:
        print(f"items ({workload.source}): " + "; ".join(f"{key} {c.describe()}" for key, c in workload.counts.items()))
    best, tied = pick(ranked)
    overlapping = sum(c.prediction.step <= ranked[0].interval[1] for c in ranked)
    if len(tied) > 1:
        print(f"the top {overlapping} overlap within the profile's measured spread, and {len(tied)} of them cannot "
              "be told apart (within 1%, or their order changes within it): the simplest of those is picked")
    elif overlapping > 1:
        print(f"the top {overlapping} overlap within the profile's measured spread, but the fastest stays fastest "
              "at both ends of it: it is picked")
    why = reason(best, ranked[1:]) if best is ranked[0] else (
        f"predicted {best.prediction.step * 1e3:.1f} ms, within the measured range of the fastest "
        f"({ranked[0].label}, M={ranked[0].microbatches}: {ranked[0].prediction.step * 1e3:.1f} ms), and simpler")
    print(f"best: {best.label}, --microbatches {best.microbatches}: {why}")
    print(f"searched {seen} candidates in {seconds:.2f} s ({seen / max(seconds, 1e-9):,.0f} per second)")
    if output:
        validate_graph(best.graph, world_size)  # what is written validates
        header = (f"# mimo-builder place: {best.label}; run with --microbatches {best.microbatches} "
                  f"--batch-size {batch_size}: predicted {best.prediction.step * 1e3:.1f} ms per step\n")
        with open(output, "w") as f:
            f.write(header + best.graph.to_yaml())
        print(f"wrote {output}", file=sys.stderr)
    return 0


def _step_range(low: float, high: float) -> str:
    """A predicted step, and its slow end where the profile's rounds differed."""
    return f"{low * 1e3:.1f}-{high * 1e3:.1f} ms" if high > low * 1.0005 else f"{low * 1e3:.1f} ms"


def _span(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _stderr():
    from rich.console import Console

    return Console(stderr=True)
