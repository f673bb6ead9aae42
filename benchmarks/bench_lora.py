"""LoRA vs full fine-tuning of the vlm backbone: optimizer and checkpoint bytes per rank.

The ``vlm`` graph (bf16, Adam with fp32 masters, MCore's distributed optimizer) on its default
4-rank placement (vision + projector on ranks 0-1, the backbone at TP=2 on ranks 2-3), once
with the backbone fully trained and once with ``lora: {rank: 4, alpha: 8}`` on it. Each run
takes one step and saves a checkpoint. Measured on the backbone's ranks, in the same run:
the optimizer's tensors (Adam's moments and fp32 master weights) and the bytes the rank wrote
to the checkpoint. Target: LoRA / full optimizer bytes <= 0.1.

Run: .venv/bin/python benchmarks/bench_lora.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402

LORA = {"rank": 4, "alpha": 8}
BACKBONE_RANKS = (2, 3)


def _graph(lora: bool):
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    data = vlm().as_dict()
    for node in data["nodes"].values():
        node["config"]["dtype"] = "bf16"
    if lora:
        data["nodes"]["lm"]["lora"] = LORA
    return Graph.from_dict(data)


def _optimizer_bytes(node_optimizer) -> int:
    """Bytes of every tensor the node's optimizer holds: its state and its (fp32 master) parameters."""
    import torch

    total = 0
    for part in getattr(node_optimizer, "chained_optimizers", [node_optimizer]):
        inner = part.optimizer
        for state in inner.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        total += sum(p.numel() * p.element_size() for group in inner.param_groups for p in group["params"])
    return total


def _measure(lora: bool, folder: str) -> dict | None:
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.document.optimizer import OptimizerSettings  # Adam
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(lora)).build_distributed_models(
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, OptimizerSettings())
    optimizer.zero_grad()
    optimizer.step(schedule.forward_backward(synthetic_batch(model.valid, 8)))
    step_dir = Checkpointer(model, optimizer).save(folder, 1)
    rank = dist.get_rank()
    written = sum(f.stat().st_size for f in Path(step_dir).glob(f"__{rank}_*.distcp"))
    result = None
    if model.hosts("lm"):
        trained = sum(p.numel() for chunk in model.chunks("lm") for p in chunk.parameters() if p.requires_grad)
        result = {"optimizer": _optimizer_bytes(optimizer.nodes["lm"].optimizer), "checkpoint": written,
                  "trained": trained}
    model.close()
    return result


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    runs = {}
    for mode in ("full", "lora"):
        with tempfile.TemporaryDirectory() as folder:
            per_rank = launch(_measure, 4, mode == "lora", folder, timeout_s=900)
        runs[mode] = {r: per_rank[r] for r in BACKBONE_RANKS}
    rows = []
    for rank in BACKBONE_RANKS:
        full, lora = runs["full"][rank], runs["lora"][rank]
        rows += [(f"rank {rank}: trained parameters, full / LoRA", f"{full['trained']:,} / {lora['trained']:,}"),
                 (f"rank {rank}: optimizer bytes, full / LoRA", f"{full['optimizer']:,} / {lora['optimizer']:,}"),
                 (f"rank {rank}: checkpoint bytes, full / LoRA", f"{full['checkpoint']:,} / {lora['checkpoint']:,}")]
    ckpt = sum(runs["lora"][r]["checkpoint"] for r in BACKBONE_RANKS) / sum(
        runs["full"][r]["checkpoint"] for r in BACKBONE_RANKS)
    rows.append(("checkpoint bytes, LoRA / full (backbone ranks)", f"{ckpt:.3f}"))
    ratio = sum(runs["lora"][r]["optimizer"] for r in BACKBONE_RANKS) / sum(
        runs["full"][r]["optimizer"] for r in BACKBONE_RANKS)
    return report("LoRA vs full fine-tuning of the vlm backbone (bf16, distributed Adam, 4 ranks)", rows,
                  "LoRA / full optimizer bytes", ratio, "<= 0.1", args.json)


if __name__ == "__main__":
    main()
