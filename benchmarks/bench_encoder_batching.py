"""Encoder batching in colocated placements: batched vs interleaved step time, in one run.

Colocated, an encoder shares its ranks with the backbone. Interleaved, it runs M forwards and M
backwards per step, one per microbatch; batched (the default where it qualifies, see
``mimo_builder._internal.runtime.batching``), one forward over all M microbatches and one backward after
the backbone's last. Two graphs on 2 gloo ranks (dp=2), M = 8, batched and interleaved
(``batch_microbatches: false``) built side by side and alternated (order reversed every round,
a barrier before each step); a step takes as long as its slower rank; medians over rounds:

- sleep nodes (``bench_pipeline``): encoder -> projector -> backbone, each call sleeping a fixed
  time (the per-call cost: kernel launches, the runtime's own work) plus a time per sample;
- the avlm graph (``colocated_dp2``: two encoders, two projectors, the Mamba backbone), real
  modules on the 2-core CPU.

Run: .venv/bin/python benchmarks/bench_encoder_batching.py [--json out.json] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_pipeline import SleepConfig, _rounds  # noqa: E402
from common import report  # noqa: E402
from mimo_builder._internal.kinds.registry import allow_modules  # noqa: E402

WORLD, M, BATCH = 2, 8, 16
ENCODER = dict(forward_ms=4.0, backward_ms=8.0, per_sample_ms=0.5)
BACKBONE = dict(forward_ms=10.0, backward_ms=20.0, per_sample_ms=1.0)
allow_modules("bench_pipeline")


def sleep_graph(batched: bool):
    """encoder -> projector -> backbone, every node on both ranks (dp=2)."""
    from mimo_builder._internal.document.graph import Graph

    graph = (Graph().add("encoder", SleepConfig(**ENCODER)).add("projector", SleepConfig(**ENCODER))
             .add("backbone", SleepConfig(**BACKBONE))
             .connect("encoder.output", "projector.input").connect("projector.output", "backbone.input")
             .bind("x", "encoder.input").output("backbone.loss"))
    return _switched(graph, batched)


def avlm_graph(batched: bool):
    from graphs.avlm import avlm

    return _switched(avlm("colocated_dp2"), batched)


def _switched(graph, batched: bool):
    for node in graph.nodes.values():
        node.batch_microbatches = batched
    return graph


def _measure(rounds: int) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    allow_modules("bench_pipeline")
    compat.init_runtime("cpu")
    fns, plans = {}, {}
    for name, make in (("sleep", sleep_graph), ("avlm", avlm_graph)):
        for batched in (True, False):
            (model,) = CompositeBuilder(make(batched)).build_distributed_models(
                ddp_config=DistributedDataParallelConfig())
            schedule, batch = GraphSchedule(model), synthetic_batch(model.valid, BATCH, seed=0)
            key = (name, "batched" if batched else "interleaved")
            fns[key] = lambda s=schedule, b=batch: s.forward_backward(b, M)
            plans[key] = schedule.plan(M).makespan
    return {"times": _rounds(fns, rounds), "plans": plans}


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = launch(_measure, WORLD, args.rounds, timeout_s=900)
    step = {key: statistics.median(map(max, zip(*(r["times"][key] for r in results)))) for key in results[0]["times"]}
    ratio = {name: step[(name, "batched")] / step[(name, "interleaved")] for name in ("sleep", "avlm")}
    rows = [("sleep nodes", f"encoder and projector {ENCODER}, backbone {BACKBONE}"),
            ("placement, microbatches, batch", f"all on {WORLD} ranks (dp={WORLD}), M={M}, {BATCH} samples")]
    for name in ("sleep", "avlm"):
        rows.append((f"{name}: interleaved, batched step", f"{step[(name, 'interleaved')] * 1e3:.0f} ms, "
                                                           f"{step[(name, 'batched')] * 1e3:.0f} ms"))
        rows.append((f"{name}: batched / interleaved", f"{ratio[name]:.3f}"))
    out = report(f"Encoder batching, colocated on {WORLD} gloo ranks, M={M} (median of {args.rounds})", rows,
                 "avlm batched / interleaved step time", ratio["avlm"], "< 1 (a gain)", args.json)
    print(f"batched/interleaved step time = sleep {ratio['sleep']:.3f}, avlm {ratio['avlm']:.3f}")
    return out


if __name__ == "__main__":
    main()
