"""A training loop over synthetic data: what ``mimo-builder run`` executes on every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder import compat
from mimo_builder.checkpoint import Checkpointer, DataPosition
from mimo_builder.graph import Graph
from mimo_builder.registry import allow_modules, allowed_prefixes
from mimo_builder.runtime.optim import GraphOptimizer
from mimo_builder.runtime.schedule import GraphSchedule
from mimo_builder.runtime.synthetic import synthetic_batch
from mimo_builder.walker import CompositeBuilder


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of the synthetic-data training loop (optimizer settings live in the graph document)."""

    steps: int = 20
    """The run's last step (a resumed run continues to it)."""
    batch_size: int = 8
    num_microbatches: int = 1
    lr: float | None = None
    """Overrides the document's graph-wide ``optimizer.lr`` (None: keep it)."""
    seed: int = 1234
    save: str | None = None
    """Checkpoint folder to write into (None: no checkpoints)."""
    save_interval: int | None = None
    """Save every this many steps (None: at the end only); the last step is always saved."""
    save_frozen: bool = False
    """Also save frozen nodes (else they come back from their ``init`` source)."""
    load: str | None = None
    """Checkpoint to resume from (a folder with ``latest``, or one step folder)."""
    step_timeout_s: float | None = 60.0
    """How long a step's forward/backward or optimizer phase may make no progress before the
    watchdog names the silent ranks and ends the run (None: no limit)."""
    first_step_timeout_s: float | None = 600.0
    """The same for the first step, which compiles kernels and warms caches."""
    checkpoint_timeout_s: float | None = None
    """How long one checkpoint save or load may take (None: no limit)."""
    allowed_modules: tuple[str, ...] = field(default_factory=allowed_prefixes)
    """Module prefixes trusted for ``module:attr`` references, applied on every rank before the
    graph is resolved (default: this process's allowlist when the options are made)."""


def train(graph: Graph, options: TrainOptions = TrainOptions()) -> list[float]:
    """Build ``graph`` on this process's ranks and train it; rank 0 prints one line per step.
    Returns the loss of every step run here (the same on every rank)."""
    compat.quiet_dependency_warnings()
    allow_modules(*options.allowed_modules)  # a spawned rank starts with the default allowlist
    device = compat.init_runtime("auto")
    if options.lr is not None:
        graph = graph.model_copy(update={"optimizer": graph.optimizer.model_copy(update={"lr": options.lr})})
    (model,) = CompositeBuilder(graph, seed=options.seed, step_timeout_s=options.step_timeout_s,
                                first_step_timeout_s=options.first_step_timeout_s).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    with model:  # its groups and watchdog go at the end, also after a failure
        return _train_built(model, options, device)


def _train_built(model, options: TrainOptions, device) -> list[float]:
    schedule = GraphSchedule(model, device=device)
    optimizer = GraphOptimizer(model, total_steps=options.steps)
    checkpointer = Checkpointer(model, optimizer, save_frozen=options.save_frozen,
                                timeout_s=options.checkpoint_timeout_s)
    done, data_seed = _resume(checkpointer, options)
    losses = []
    for step in range(done + 1, options.steps + 1):
        batch = synthetic_batch(model.valid, options.batch_size, seed=data_seed + step)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = schedule.forward_backward(batch, options.num_microbatches)
        result = optimizer.step(loss)
        seconds = time.perf_counter() - start
        losses.append(loss)
        _print(_step_line(step, loss, result, batch, seconds))
        if options.save and (step == options.steps or (options.save_interval and step % options.save_interval == 0)):
            path = checkpointer.save(options.save, step, DataPosition(
                seed=data_seed, batch_size=options.batch_size, consumed_samples=step * options.batch_size))
            _print(f"saved step {step} to {path}")
    if optimizer.skipped_steps:
        _print(f"skipped {optimizer.skipped_steps} steps in all (non-finite loss or gradients)")
    return losses


def _resume(checkpointer: Checkpointer, options: TrainOptions) -> tuple[int, int]:
    """The last step done and the data stream's seed: from the checkpoint when loading."""
    if not options.load:
        return 0, options.seed
    resumed = checkpointer.load(options.load)
    _print(f"resumed from {options.load} at step {resumed.step}"
           + "".join(f"\n  resharded: node '{n}' (placement differs)" for n in resumed.resharded)
           + "".join(f"\n  reset: {note}" for note in resumed.reset))
    return resumed.step, resumed.data.seed if resumed.data else options.seed


def _print(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def _step_line(step, loss, result, batch, seconds) -> str:
    tokens = sum(v.numel() for k, v in batch.items() if k == "input_ids")
    note = f" | skipped: non-finite {', '.join(result.nonfinite_nodes) or 'loss'}" if result.skipped else ""
    return (f"step {step:>3} | loss {loss:7.4f} | grad norm {result.grad_norm:7.3f} | "
            f"{tokens / seconds:8.0f} tokens/s | {seconds * 1e3:6.0f} ms{note}")
