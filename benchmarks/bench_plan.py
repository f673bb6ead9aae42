"""Dry-run planning of a 3-node graph on 16,384 ranks against a 1 s budget.

The graph is vision -> proj -> lm with the encoders on ranks 0-8191 (tp=1) and the Mamba
backbone on ranks 8192-16383 (tp=4, pp=2, pattern "M*|-M"). The split is half/half because
the walker's edge rule needs the data-parallel sizes of connected nodes to divide each other:
encoders on 0-4095 (dp 4096) feeding an lm on 4096-16383 at tp=4 pp=2 (dp 1536) is rejected.
Measured in this process (make_plan must run where torch.distributed is not initialised; it
counts parameters on torch's fake backend): ``make_plan`` with count_params=True and False,
``plan.as_dict()`` (all 16,384 ranks), and ``make_plan`` of the 1-rank vlm graph as a baseline.

Run: .venv/bin/python benchmarks/bench_plan.py [--json out.json] [--repeats N]
Reports medians and the ratio (make_plan(count_params=True) + as_dict) / 1 s (target <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

WORLD = 16384
SPLIT = 8192  # first rank of the lm
BUDGET_S = 1.0


def big_graph():
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Placement

    # The vlm graph re-placed: tp=4 needs mamba_num_groups divisible by 4; pp=2 one '|' in the pattern.
    graph = vlm("single")
    graph.nodes["vision"].placement = Placement(offset=0, size=SPLIT)
    graph.nodes["proj"].placement = Placement(offset=0, size=SPLIT)
    graph.nodes["lm"].placement = Placement(offset=SPLIT, size=WORLD - SPLIT, tp=4, pp=2)
    graph.nodes["lm"].config.update(hybrid_layer_pattern="M*|-M", mamba_num_groups=4)
    return graph


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mimo_builder._internal.platform.compat import quiet_dependency_warnings

    quiet_dependency_warnings()
    import torch.distributed as dist

    from graphs.vlm import vlm
    from mimo_builder._internal.planning.plan import make_plan

    assert not dist.is_initialized()
    graph, small = big_graph(), vlm("single")
    plan = make_plan(graph, WORLD)
    ranks = plan.as_dict()["ranks"]
    assert len(ranks) == WORLD and ranks[0]["params"] and ranks[-1]["params"], "plan lacks ranks or counts"
    assert set(ranks[0]["nodes"]) == {"vision", "proj"} and set(ranks[-1]["nodes"]) == {"lm"}

    times = interleaved_medians({
        "counted": lambda: make_plan(graph, WORLD),
        "uncounted": lambda: make_plan(graph, WORLD, count_params=False),
        "as_dict": plan.as_dict,
        "world1": lambda: make_plan(small, 1),
    }, repeats=args.repeats)
    total = times["counted"] + times["as_dict"]
    lm = next(n for n in plan.nodes if n.name == "lm")
    return report(
        f"make_plan + as_dict, vision/proj on 0-{SPLIT - 1}, lm tp=4 pp=2 on {SPLIT}-{WORLD - 1} ({WORLD} ranks)",
        [("make_plan(count_params=True) (median)", f"{times['counted'] * 1e3:.1f} ms"),
         ("make_plan(count_params=False) (median)", f"{times['uncounted'] * 1e3:.2f} ms"),
         (f"plan.as_dict(), {WORLD} ranks (median)", f"{times['as_dict'] * 1e3:.1f} ms"),
         ("total: counted + as_dict", f"{total * 1e3:.1f} ms"),
         ("baseline: make_plan(vlm 'single', 1) (median)", f"{times['world1'] * 1e3:.1f} ms"),
         ("lm stage params / whole", f"{lm.stage_params} / {lm.params}"),
         ("process groups created", f"{plan.num_groups:,}")],
        "ratio total / 1 s", total / BUDGET_S, "<= 1.0", args.json)


if __name__ == "__main__":
    main()
