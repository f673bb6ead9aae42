"""Process groups with sharing (one set per distinct layout) vs one set per node.

A 6-node graph (the avlm graph on 4 ranks, "disjoint4", plus a sixth projector on the lm's
ranks) has 2 distinct layouts: 4 nodes on ranks 0-1 (tp=1) and 2 nodes on ranks 2-3 (tp=2).
On a 4-rank gloo world, ``create_process_groups(layouts)`` (which deduplicates, as the walker
does) is timed against one ``create_process_groups([layout])`` call per node (6 calls). Each
run creates fresh groups; the variants alternate, the order reversed each round; a run's time
is the slowest rank's. Also compared: the process groups created (``num_groups``).

Run: .venv/bin/python benchmarks/bench_groups.py [--json out.json] [--repeats N]
Reports medians and the ratio shared / per-node time (target <= 0.5: 2 layouts vs 6 nodes
should cost about 1/3) and the count ratio (exactly 2/6).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402

WORLD = 4


def six_node_graph():
    from graphs import parts
    from graphs.avlm import avlm
    from mimo_builder._internal.document.graph import Placement

    return (avlm("disjoint4")
            .add("text_proj", parts.projector(), placement=Placement(offset=2, size=2, tp=2))
            .bind("text_features", "text_proj.input"))


def _measure(node_layouts, repeats):
    """On every rank: per run and variant, this rank's seconds and the groups created."""
    import torch.distributed as dist

    from mimo_builder._internal.placement import create_process_groups

    variants = {
        "shared": lambda: [create_process_groups(node_layouts)],
        "per_node": lambda: [create_process_groups([layout]) for layout in node_layouts],
    }
    times = {name: [] for name in variants}
    counts = {}
    order = list(variants.items())
    for i in range(repeats + 1):  # round 0 is warm-up
        for name, fn in order if i % 2 == 0 else reversed(order):
            dist.barrier()
            start = time.perf_counter()
            sets = fn()
            elapsed = time.perf_counter() - start
            if i:
                times[name].append(elapsed)
            counts[name] = sum(s.num_groups for s in sets)
    dist.barrier()
    return times, counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mimo_builder._internal.platform.compat import quiet_dependency_warnings

    quiet_dependency_warnings()
    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.placement import count_process_groups
    from mimo_builder._internal.validation import validate_graph

    valid = validate_graph(six_node_graph(), WORLD)
    node_layouts = [valid.layouts[name] for name in valid.order]
    assert len(node_layouts) == 6 and len(set(node_layouts)) == 2, node_layouts

    per_rank = launch(_measure, WORLD, node_layouts, args.repeats, timeout_s=900)
    runs = {name: [max(times[name][i] for times, _ in per_rank) for i in range(args.repeats)]
            for name in ("shared", "per_node")}
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    counts = per_rank[0][1]
    assert all(c == counts for _, c in per_rank), "ranks disagree on num_groups"
    assert counts["shared"] == count_process_groups(node_layouts)
    count_ratio = counts["shared"] / counts["per_node"]
    ratio = med["shared"] / med["per_node"]
    result = report(
        f"create_process_groups: shared (2 layouts) vs per node (6 nodes), {WORLD} gloo ranks, CPU",
        [("shared, 1 call (median of slowest rank)", f"{med['shared'] * 1e3:.1f} ms"),
         ("per node, 6 calls (median of slowest rank)", f"{med['per_node'] * 1e3:.1f} ms"),
         ("num_groups shared / per node", f"{counts['shared']} / {counts['per_node']}"),
         ("count ratio shared / per node", f"{count_ratio:.3f}"),
         ("repeats", str(args.repeats))],
        "ratio shared / per node (time)", ratio, "<= 0.5; ideal 2/6 = 0.333", None)
    result["count_ratio"] = count_ratio
    result["runs_s"] = runs
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
