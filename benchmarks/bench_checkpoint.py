"""Checkpoint save and load: the Checkpointer vs bare dist_checkpointing on the same state.

The ``vlm`` graph (bf16, Adam with fp32 masters) on 2 colocated DP ranks after one step. The
baseline saves and loads exactly the sharded state the Checkpointer writes (model and optimizer
of every node, generator states) with Megatron-Core's ``dist_checkpointing.save`` / ``load``
into plain folders. The Checkpointer adds the manifest and its gather, the fit checks, safe
unpickling, the atomic commit (fsync, renames) and restoring every state. Target: ours / bare
<= 1.15 for save + load. Also reported: one save in training steps of the same graph.

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

    return interleaved_medians({"ours": ours, "bare": bare, "step": step}, repeats=REPEATS)


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
    return report("checkpoint: Checkpointer vs bare dist_checkpointing (vlm, bf16, 2 ranks)", rows,
                  "ours / bare", ratio, "<= 1.15", args.json)


if __name__ == "__main__":
    main()
