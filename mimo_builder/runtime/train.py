"""A training loop over synthetic data: what ``mimo-builder run`` executes on every rank."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder import compat
from mimo_builder.checkpoint import Checkpointer, DataPosition
from mimo_builder.graph import Graph
from mimo_builder.registry import allow_modules, allowed_prefixes
from mimo_builder.runtime.monitor import StepRecord, TrainingMonitor
from mimo_builder.runtime.optim import GraphOptimizer
from mimo_builder.runtime.schedule import GraphSchedule
from mimo_builder.runtime.synthetic import synthetic_batch
from mimo_builder.runtime.timing import PhaseTimer, gather_to_first, slowest_per_node
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
    log_interval: int | None = None
    """Print a summary every this many steps (None: about fifty lines per run)."""
    tensorboard: str | None = None
    """Folder for TensorBoard event files (None: none written; needs the ``tensorboard`` extra)."""
    allowed_modules: tuple[str, ...] = field(default_factory=allowed_prefixes)
    """Module prefixes trusted for ``module:attr`` references, applied on every rank before the
    graph is resolved (default: this process's allowlist when the options are made)."""


def train(graph: Graph, options: TrainOptions = TrainOptions()) -> list[float]:
    """Build ``graph`` on this process's ranks and train it; rank 0 prints a summary every
    ``log_interval`` steps (with each node's time split) and writes TensorBoard scalars if asked.
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
    timer = PhaseTimer(device)
    schedule = GraphSchedule(model, device=device, timer=timer)
    optimizer = GraphOptimizer(model, total_steps=options.steps, timer=timer)
    checkpointer = Checkpointer(model, optimizer, save_frozen=options.save_frozen,
                                timeout_s=options.checkpoint_timeout_s)
    done, data_seed = _resume(checkpointer, options)
    losses = []
    with _monitor(options, done + 1) as monitor:
        for step in range(done + 1, options.steps + 1):
            batch = synthetic_batch(model.valid, options.batch_size, seed=data_seed + step)
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = schedule.forward_backward(batch, options.num_microbatches)
            result = optimizer.step(loss)
            seconds = time.perf_counter() - start
            losses.append(loss)
            _report(monitor, model, optimizer, timer.take(), StepRecord(
                step, loss, result.grad_norm, _tokens(batch), seconds, skipped=result.skipped,
                nonfinite_nodes=result.nonfinite_nodes))
            if options.save and (step == options.steps or (options.save_interval and step % options.save_interval == 0)):
                path = checkpointer.save(options.save, step, DataPosition(
                    seed=data_seed, batch_size=options.batch_size, consumed_samples=step * options.batch_size))
                _message(monitor, f"saved step {step} to {path}")
        if optimizer.skipped_steps:
            _message(monitor, f"skipped {optimizer.skipped_steps} steps in all (non-finite loss or gradients)")
    return losses


def _monitor(options: TrainOptions, first_step: int):
    """Rank 0 displays the run; the other ranks only send it their timings."""
    if dist.get_rank() != 0:
        return contextlib.nullcontext()
    return TrainingMonitor(first_step, options.steps, options.log_interval, options.tensorboard)


def _report(monitor, model, optimizer, seconds, record: StepRecord) -> None:
    """Gather every rank's node timings and learning rates to rank 0, which records the step."""
    parts = gather_to_first((seconds, optimizer.learning_rates()), optimizer.control)
    if parts is None:
        return
    record.node_seconds = slowest_per_node([times for times, _ in parts], model.valid.order)
    record.learning_rates = {node: rate for _, rates in parts for node, rate in rates.items()}
    monitor.record(record)


def _message(monitor, line: str) -> None:
    if monitor is not None:
        monitor.message(line)


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


def _tokens(batch) -> int:
    return sum(v.numel() for k, v in batch.items() if k == "input_ids")
