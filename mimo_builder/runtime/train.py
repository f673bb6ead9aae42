"""A training loop over synthetic data: what ``mimo-builder run`` executes on every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder import compat
from mimo_builder.graph import Graph
from mimo_builder.runtime.optim import GraphOptimizer
from mimo_builder.runtime.schedule import GraphSchedule
from mimo_builder.runtime.synthetic import synthetic_batch
from mimo_builder.walker import CompositeBuilder


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of the synthetic-data training loop (optimizer settings live in the graph document)."""

    steps: int = 20
    batch_size: int = 8
    num_microbatches: int = 1
    lr: float | None = None
    """Overrides the document's graph-wide ``optimizer.lr`` (None: keep it)."""
    seed: int = 1234


def train(graph: Graph, options: TrainOptions = TrainOptions()) -> list[float]:
    """Build ``graph`` on this process's ranks and train it; rank 0 prints one line per step.
    Returns the loss of every step (the same on every rank)."""
    compat.quiet_dependency_warnings()
    device = compat.init_runtime("auto")
    if options.lr is not None:
        graph = graph.model_copy(update={"optimizer": graph.optimizer.model_copy(update={"lr": options.lr})})
    (model,) = CompositeBuilder(graph, seed=options.seed).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    schedule = GraphSchedule(model, device=device)
    optimizer = GraphOptimizer(model, total_steps=options.steps)
    losses = []
    for step in range(1, options.steps + 1):
        batch = synthetic_batch(model.valid, options.batch_size, seed=options.seed + step)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = schedule.forward_backward(batch, options.num_microbatches)
        result = optimizer.step(loss)
        seconds = time.perf_counter() - start
        losses.append(loss)
        if dist.get_rank() == 0:
            print(_step_line(step, loss, result, batch, seconds), flush=True)
    if dist.get_rank() == 0 and optimizer.skipped_steps:
        print(f"skipped {optimizer.skipped_steps} of {options.steps} steps (non-finite loss or gradients)")
    return losses


def _step_line(step, loss, result, batch, seconds) -> str:
    tokens = sum(v.numel() for k, v in batch.items() if k == "input_ids")
    note = f" | skipped: non-finite {', '.join(result.nonfinite_nodes) or 'loss'}" if result.skipped else ""
    return (f"step {step:>3} | loss {loss:7.4f} | grad norm {result.grad_norm:7.3f} | "
            f"{tokens / seconds:8.0f} tokens/s | {seconds * 1e3:6.0f} ms{note}")
