"""The graph walker building the 3-node vlm graph (placement "single", 1 rank) vs the same three
nodes built by hand with each node's own builder.

Both sides do the same real work per call: create the process groups for the nodes' layouts
(one set per distinct layout, as the walker does), then for each node seed the RNGs and call
``config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())``. The
walker additionally validates the graph, makes its failure-agreement group and agrees after
each node: that is the overhead measured.

Run: .venv/bin/python benchmarks/bench_walker.py [--json out.json] [--repeats N] [--profile DIR]
Reports medians of >= 9 alternating builds each and the ratio walker / by hand (target <= 1.02).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

SEED = 1234  # CompositeBuilder's default seed


def _by_hand(nodes):
    """nodes: [(config, layout)] in topological order."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import create_process_groups

    groups = create_process_groups([layout for _, layout in nodes])
    out = {}
    for config, layout in nodes:
        pgs = groups.for_layout(layout)
        seed_rng(SEED, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank())
        out[config.builder] = config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
    return out


def _walker(graph):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder

    return CompositeBuilder(graph, seed=SEED).build_distributed_models(ddp_config=DistributedDataParallelConfig())


def _measure(repeats, profile_dir):
    import torch.distributed as dist

    from graphs.parts import IMAGE_TOKEN, backbone, projector, vision
    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu")
    graph = vlm("single")
    world = dist.get_world_size()
    layout = Layout(0, world)
    nodes = [(vision(), layout), (projector(), layout), (backbone(image=IMAGE_TOKEN), layout)]

    # Sanity: both sides build the same parameters.
    (composite,) = _walker(graph)
    hand = _by_hand(nodes)
    for name, (config, _) in zip(("vision", "proj", "lm"), nodes):
        a = [p for c in composite.chunks(name) for p in c.parameters()]
        b = [p for c in hand[config.builder] for p in c.parameters()]
        assert len(a) == len(b) and all(x.equal(y) for x, y in zip(a, b)), f"node {name} differs"

    # Groups are measured in the same rotation: every gloo group keeps 3 threads and 4 fds
    # alive, and creation slows down as they accumulate, which must hit all three alike.
    times = interleaved_medians({"by_hand": lambda: _by_hand(nodes), "walker": lambda: _walker(graph),
                                 "groups": lambda: create_process_groups([layout] * 3)}, repeats=repeats)
    if profile_dir:
        import cProfile
        import pstats

        for name, fn in (("walker", lambda: _walker(graph)), ("by_hand", lambda: _by_hand(nodes))):
            prof = cProfile.Profile()
            prof.runcall(lambda: [fn() for _ in range(repeats)])
            prof.dump_stats(os.path.join(profile_dir, f"{name}.prof"))
            print(f"--- {name}: mimo_builder functions by cumulative time over {repeats} builds")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(r"mimo_builder/|\(entry_points\)", 12)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="also write cProfile stats (walker.prof, by_hand.prof) here")
    args = parser.parse_args(argv)
    if args.repeats < 9:
        parser.error("--repeats must be >= 9")
    profile_dir = args.profile and os.path.abspath(args.profile)
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)

    from mimo_builder._internal.platform.launch import launch

    times = launch(_measure, 1, args.repeats, profile_dir, timeout_s=900)[0]
    ratio = times["walker"] / times["by_hand"]
    return report(
        "CompositeBuilder vs per-node builders by hand (vlm 'single': vision -> proj -> lm, 1 rank, CPU)",
        [("by hand (median)", f"{times['by_hand'] * 1e3:.1f} ms"),
         ("walker (median)", f"{times['walker'] * 1e3:.1f} ms"),
         ("walker - by hand", f"{(times['walker'] - times['by_hand']) * 1e3:.1f} ms"),
         ("create_process_groups, 1 layout (median; in both)", f"{times['groups'] * 1e3:.1f} ms"),
         ("repeats", str(args.repeats))],
        "ratio walker / by hand", ratio, "<= 1.02", args.json)


if __name__ == "__main__":
    main()
