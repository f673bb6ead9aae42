"""Checkpoint save and load: the Checkpointer vs bare dist_checkpointing on the same state.

The ``vlm`` graph (bf16, Adam with fp32 masters) on 2 colocated DP ranks after one step. The
baseline saves and loads exactly the sharded state the Checkpointer writes (model and optimizer
of every node, generator states) with Megatron-Core's ``dist_checkpointing.save`` / ``load``
into plain folders. The Checkpointer adds the manifest and its gather, the fit checks, safe
unpickling, the atomic commit (fsync, renames) and restoring every state. Target: ours / bare
<= 1.15 for save + load. Also reported: one save in training steps of the same graph.

Second, background saves (``run --async-save``): the mean step time while a background save is
being written (every step from the fork to the step's publication) over the median step time
without one, measured in alternation. Target: <= 1.10.

Run: .venv/bin/python benchmarks/bench_checkpoint.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

REPEATS = 7


def _measure(folder: str) -> dict[str, float]:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    graph = vlm("colocated_dp2")
    for node in graph.nodes.values():
        node.config["dtype"] = "bf16"
    (model,) = CompositeBuilder(graph).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model)
    batch = synthetic_batch(model.valid, 8)

    def step():
        optimizer.zero_grad()
        optimizer.step(schedule.forward_backward(batch))

    step()
    checkpointer = Checkpointer(model, optimizer)
    count = itertools.count()

    def ours():
        path = checkpointer.save(f"{folder}/ours", next(count))
        checkpointer.load(path)

    def bare():
        from mimo_builder._internal.checkpoint import state

        target = f"{folder}/bare/{next(count)}"
        if dist.get_rank() == 0:
            os.makedirs(target)
        dist.barrier()
        tree = checkpointer._tree(loading=False, nodes=list(model.valid.order))
        tree["rng"] = state.rng_state(dist.get_rank(), dist.get_world_size())
        with checkpointer._scope():
            dist_checkpointing.save(state.sharded_leaves(tree), target)
            again = checkpointer._tree(loading=True, nodes=list(model.valid.order))
            again["rng"] = state.rng_state(dist.get_rank(), dist.get_world_size())
            dist_checkpointing.load(state.sharded_leaves(again), target)

    times = interleaved_medians({"ours": ours, "bare": bare, "step": step}, repeats=REPEATS)
    return {**times, **_background(checkpointer, step, folder)}


def _background(checkpointer, step, folder: str) -> dict[str, float]:
    """Median plain step; mean step while a background save is written; steps per save."""
    import statistics
    import time

    def timed() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    plain, during, spans, stalls, blocking = [], [], [], [], []
    for i in range(REPEATS):
        plain.append(timed())
        start = time.perf_counter()
        checkpointer.save(f"{folder}/blocking", 1000 + i)
        blocking.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.save(f"{folder}/background", 1000 + i, background=True)
        stalls.append(time.perf_counter() - start)
        span = []
        while not span or not checkpointer.finish_background():
            span.append(timed())
        during.extend(span)
        spans.append(len(span))
    return {"plain_step": statistics.median(plain), "step_during_save": statistics.mean(during),
            "steps_per_save": statistics.median(spans), "blocking_save": statistics.median(blocking),
            "background_stall": statistics.median(stalls)}


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        times = launch(_measure, 2, folder, timeout_s=900)[0]
    ratio = times["ours"] / times["bare"]
    rows = [("Checkpointer save + load", f"{times['ours'] * 1e3:.0f} ms"),
            ("bare dist_checkpointing save + load", f"{times['bare'] * 1e3:.0f} ms"),
            ("one training step", f"{times['step'] * 1e3:.0f} ms"),
            ("save + load in training steps", f"{times['ours'] / times['step']:.2f}")]
    report("checkpoint: Checkpointer vs bare dist_checkpointing (vlm, bf16, 2 ranks)", rows,
           "ours / bare", ratio, "<= 1.15", args.json)
    background = times["step_during_save"] / times["plain_step"]
    rows = [("step without a save (median)", f"{times['plain_step'] * 1e3:.0f} ms"),
            ("step while a background save is written (mean)", f"{times['step_during_save'] * 1e3:.0f} ms"),
            ("steps a background save spans (median)", f"{times['steps_per_save']:.0f}"),
            ("training stalled by a blocking save (median)", f"{times['blocking_save'] * 1e3:.0f} ms"),
            ("training stalled by a background save (median: its planning)", f"{times['background_stall'] * 1e3:.0f} ms")]
    return report("background saves (run --async-save; vlm, bf16, 2 ranks)", rows,
                  "step during a save / step without", background, "<= 1.10",
                  args.json and args.json.replace(".json", "_background.json"))


if __name__ == "__main__":
    main()
