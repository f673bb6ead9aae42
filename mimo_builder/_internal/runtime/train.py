"""A training loop over synthetic data: what ``mimo-builder run`` executes on every rank."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field

import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder._internal.platform import compat
from mimo_builder._internal.platform.cpu_rng import offset_seed
from mimo_builder._internal.checkpoint import Checkpointer, DataPosition
from mimo_builder._internal.checkpoint.files import read_stream_states, step_of
from mimo_builder._internal.data import load_data
from mimo_builder._internal.data.loader import RankLoader
from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.kinds.registry import active_registry, allow_modules, allowed_prefixes, import_roots
from mimo_builder._internal.runtime.monitor import StepRecord, TrainingMonitor
from mimo_builder._internal.runtime.optim import GraphOptimizer
from mimo_builder._internal.runtime.preemption import Preempted, PreemptionSignals, SaveClock
from mimo_builder._internal.runtime.schedule import GraphSchedule, StepError
from mimo_builder._internal.runtime.packing import LENGTHS_PORT, PackedCount
from mimo_builder._internal.runtime.shards import RankBatch
from mimo_builder._internal.runtime.throughput import graph_work
from mimo_builder._internal.runtime.synthetic import synthetic_batch
from mimo_builder._internal.runtime.timing import PhaseTimer, gather_to_first, slowest_per_node
from mimo_builder._internal.assembly.walker import CompositeBuilder


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
    save_interval_minutes: float | None = None
    """Also save once this much wall time passed since the last save (None: by steps only)."""
    save_frozen: bool = False
    """Also save frozen nodes (else they come back from their ``init`` source)."""
    async_save: bool = False
    """Write each save but the last (and a preemption's) in the background while training goes on."""
    load: str | None = None
    """Checkpoint to resume from (a folder with ``latest``, or one step folder)."""
    step_timeout_s: float | None = 60.0
    """How long a step's forward/backward or optimizer phase may make no progress before the
    watchdog names the silent ranks and ends the run (None: no limit)."""
    first_step_timeout_s: float | None = 600.0
    """The same for the first step, which compiles kernels and warms caches."""
    checkpoint_timeout_s: float | None = None
    """How long one checkpoint save or load may take (None: no limit)."""
    data: str | None = None
    """``module:function`` returning the training GraphData, or ``llava:PATH`` (None: synthetic batches)."""
    eval_data: str | None = None
    """``module:function`` returning held-out GraphData, or ``llava:PATH``, evaluated before and after training."""
    eval_interval: int | None = None
    """Also evaluate ``eval_data`` every this many steps during training (None: before and after only)."""
    image_root: str | None = None
    """Folder the images of ``llava:`` data are read from (None: each JSON file's folder)."""
    tokenizer: str | None = None
    """Hugging Face tokenizer folder for ``llava:`` data (None: the byte tokenizer)."""
    log_interval: int | None = None
    """Print a summary every this many steps (None: about fifty lines per run)."""
    tensorboard: str | None = None
    """Folder for TensorBoard event files (None: none written; needs the ``tensorboard`` extra)."""
    peak_tflops: float | None = None
    """One device's peak TFLOP/s for the MFU figures (None: the datasheet's for a known GPU, else no MFU)."""
    allowed_modules: tuple[str, ...] = field(default_factory=allowed_prefixes)
    """Module prefixes trusted for ``module:attr`` references, applied on every rank before the
    graph is resolved (default: this process's allowlist when the options are made)."""
    import_roots: tuple[str, ...] = field(default_factory=import_roots)
    """Folders allowed top-level packages are imported from when not installed (the CLI's
    current directory), applied on every rank like ``allowed_modules``."""


def train(graph: Graph, options: TrainOptions = TrainOptions()) -> list[float]:
    """Build ``graph`` on this process's ranks and train it; rank 0 prints a summary every
    ``log_interval`` steps (with each node's time split) and writes TensorBoard scalars if asked.
    Returns the loss of every step run here (the same on every rank)."""
    compat.quiet_dependency_warnings()
    allow_modules(*options.allowed_modules)  # a spawned rank starts with the default allowlist
    active_registry().add_roots(*options.import_roots)  # and imports from where the launcher did
    device = compat.init_runtime("auto")
    if options.lr is not None:
        graph = graph.model_copy(update={"optimizer": graph.optimizer.model_copy(update={"lr": options.lr})})
    (model,) = CompositeBuilder(graph, seed=options.seed, step_timeout_s=options.step_timeout_s,
                                first_step_timeout_s=options.first_step_timeout_s).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    with model:  # its groups and watchdog go at the end, also after a failure
        try:
            return _train_built(model, options, device)
        except MimoError:
            raise
        except (RuntimeError, dist.DistError) as err:  # a collective between the watched phases
            raise StepError(model.guard.publish_error(model.guard.detail, err)) from err


def _train_built(model, options: TrainOptions, device) -> list[float]:
    timer = PhaseTimer(device)
    schedule = GraphSchedule(model, device=device, timer=timer)
    optimizer = GraphOptimizer(model, total_steps=options.steps, timer=timer)
    checkpointer = Checkpointer(model, optimizer, save_frozen=options.save_frozen,
                                timeout_s=options.checkpoint_timeout_s)
    for name, what in model.initialized_from.items():  # the document's init: sources
        _print(f"node '{name}': {what}")
    resumed = _resume(checkpointer, options)
    done = resumed.step if resumed else 0
    data_seed = resumed.data.seed if resumed and resumed.data else options.seed
    loader = _loader(model, options, done, data_seed)
    held_out = _data(options, options.eval_data, "--eval-data", model.valid) if options.eval_data else None
    work = graph_work(model, options.batch_size, options.num_microbatches, device, options.peak_tflops)
    losses, packed = [], PackedCount()
    with _monitor(options, done + 1, work) as monitor, checkpointer.writing():
        before = _evaluate(monitor, schedule, model, held_out, options, "before training") if held_out else None
        timer.take()  # evaluation is not part of the first step's time
        if device.type == "cuda":
            _message(monitor, first_step_notice())
        if loader is not None and resumed is not None:
            _message(monitor, _restore_stream(loader, resumed))
        batches = loader if loader is not None else _synthetic(model, options, done, data_seed)
        save = functools.partial(_save, monitor, checkpointer, options, loader, data_seed)
        clock = SaveClock(options.save_interval_minutes)
        with PreemptionSignals() as signals:
            for step, batch in batches:
                start = time.perf_counter()
                optimizer.zero_grad()
                loss = schedule.forward_backward(batch, options.num_microbatches)
                result = optimizer.step(loss)
                seconds = time.perf_counter() - start
                losses.append(loss)
                packed += _report(monitor, model, optimizer, timer.take(), StepRecord(
                    step, loss, result.grad_norm, 0, seconds, skipped=result.skipped,
                    nonfinite_nodes=result.nonfinite_nodes), _tokens(batch))
                received, timed = signals.agree(model.control, clock.due())
                due = timed or step == options.steps or (options.save_interval and step % options.save_interval == 0)
                _published(monitor, checkpointer.finish_background())
                if options.save and (due or received):
                    save(step, background=options.async_save and not received and step < options.steps)
                    clock.saved()
                if received and step < options.steps:
                    raise _preempted(options, step, received)
                if held_out and _eval_due(options, step):
                    _evaluate(monitor, schedule, model, held_out, options, f"at step {step}")
                    timer.take()  # evaluation is not part of the next step's time
        _published(monitor, checkpointer.finish_background(wait=True))
        if packed.rows:
            _message(monitor, packed.line())
        if optimizer.skipped_steps:
            _message(monitor, f"skipped {optimizer.skipped_steps} steps in all (non-finite loss or gradients)")
        if held_out:
            after = _evaluate(monitor, schedule, model, held_out, options, "after training")
            _accuracy(monitor, before, after)
    return losses


def _eval_due(options: TrainOptions, step: int) -> bool:
    """Whether ``--eval-interval`` evaluates after ``step`` (the last step's is "after training")."""
    return bool(options.eval_interval) and step % options.eval_interval == 0 and step < options.steps


def first_step_notice() -> str:
    """What a CUDA run says before its first step, which compiles (and autotunes) the Triton
    kernels: silence for minutes looks like a hang."""
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.environ.get("TRITON_HOME", "~"), ".triton", "cache")
    return f"compiling GPU kernels for the first step; later runs reuse the cache ({cache})"


def _synthetic(model, options: TrainOptions, done: int, data_seed: int):
    """(step, whole synthetic batch) for the steps left, the same on every rank."""
    return ((step, synthetic_batch(model.valid, options.batch_size, seed=offset_seed(data_seed, step)))
            for step in range(done + 1, options.steps + 1))


def _loader(model, options: TrainOptions, done: int, data_seed: int) -> RankLoader | None:
    """This rank's share of ``--data`` for the steps left (None: synthetic batches)."""
    if not options.data:
        return None
    data = _data(options, options.data, "--data", model.valid)
    return data.loader(model.valid, dist.get_rank(), options.batch_size, num_microbatches=options.num_microbatches,
                       first_step=done + 1, last_step=options.steps, seed=data_seed)


def _data(options: TrainOptions, ref: str, flag: str, valid):
    """The GraphData ``ref`` names, resolved on this rank as the launcher checked it."""
    return load_data(ref, flag, valid, image_root=options.image_root, tokenizer=options.tokenizer)


def _save(monitor, checkpointer: Checkpointer, options: TrainOptions, loader, data_seed: int, step: int,
          background: bool = False) -> None:
    path = checkpointer.save(options.save, step, _position(loader, options, data_seed, step),
                             loader.states() if loader is not None else None, background=background)
    _published(monitor, checkpointer.finish_background())  # a background save the new one waited for
    _message(monitor, f"saving step {step} in the background" if background else f"saved step {step} to {path}")


def _published(monitor, folders) -> None:
    """Say which background saves were published (their step folders)."""
    for folder in folders:
        _message(monitor, f"saved step {step_of(folder)} to {folder}")


def _preempted(options: TrainOptions, step: int, received: str) -> Preempted:
    """The error that ends a run stopped after ``step`` for a preemption signal (saved with --save)."""
    where = (f"step {step} is saved in {options.save}: the same command with --resume continues from it"
             if options.save else "nothing was saved (no --save)")
    return Preempted(f"stopped after step {step} of {options.steps} for {received} (preemption); {where}")


def _position(loader: RankLoader | None, options: TrainOptions, data_seed: int, step: int) -> DataPosition:
    """Where the data stream stands after ``step``, for the checkpoint."""
    return DataPosition(seed=data_seed, batch_size=options.batch_size, consumed_samples=step * options.batch_size,
                        num_chunks=loader.layout.num_chunks if loader is not None else None,
                        stream_states=loader is not None and hasattr(loader.source, "state"))


def _restore_stream(loader: RankLoader, resumed) -> str | None:
    """Put a stream's saved per-chunk states back (its next batch is the one after the checkpoint's
    step); where they do not fit this run's batches the stream reads up to that step again."""
    saved = resumed.data
    if saved is None or not saved.stream_states:
        return None
    if saved.num_chunks != loader.layout.num_chunks or saved.batch_size != loader.layout.batch_size:
        return (f"data: the checkpoint's stream states are for batches of {saved.batch_size} in {saved.num_chunks} "
                f"chunks, this run reads {loader.layout.batch_size} in {loader.layout.num_chunks}; the stream "
                f"reads up to step {resumed.step} again")
    loader.restore(read_stream_states(resumed.folder, loader.chunks))
    return f"data: the stream continues after step {resumed.step} from the checkpoint's state"


RATES = (".correct", ".free_running")  # per-sample outputs shown as shares


def _evaluate(monitor, schedule, model, held_out, options: TrainOptions, when: str) -> dict[str, float]:
    """The means of the graph's losses and per-sample outputs over one ordered pass of the held-out set."""
    steps = held_out.evaluation_steps(options.batch_size)
    loader = held_out.loader(model.valid, dist.get_rank(), options.batch_size,
                             num_microbatches=options.num_microbatches, last_step=steps, shuffle=False)
    means: dict[str, float] = {}
    for _, batch in loader:
        for name, value in schedule.evaluate(batch, options.num_microbatches).items():
            means[name] = means.get(name, 0.0) + value / steps
    shown = " | ".join(f"{k} {v:.1%}" if k.endswith(RATES) else f"{k} {v:.4f}" for k, v in means.items())
    _message(monitor, f"held-out {when}: {shown} ({steps * options.batch_size} samples)")
    return means


def _accuracy(monitor, before: dict[str, float], after: dict[str, float]) -> None:
    for name in (k for k in after if k.endswith(".correct")):
        _message(monitor, f"accuracy: before {before[name]:.1%}, after {after[name]:.1%}")
    for name in (k for k in after if k.endswith(".free_running")):
        _message(monitor, f"free-running accuracy: {after[name]:.1%} (the answer generated from the prompt alone)")


def _monitor(options: TrainOptions, first_step: int, work):
    """Rank 0 displays the run; the other ranks only send it their timings."""
    if dist.get_rank() != 0:
        return contextlib.nullcontext()
    return TrainingMonitor(first_step, options.steps, options.log_interval, options.tensorboard, work=work,
                           world_size=dist.get_world_size())


def _report(monitor, model, optimizer, seconds, record: StepRecord, tokens: int | None) -> PackedCount:
    """Gather every rank's node timings, learning rates, token count and packed rows to rank 0,
    which records the step (a rank that holds no token ids counts none). Returns what the step
    packed (on rank 0; nothing elsewhere)."""
    parts = gather_to_first((seconds, optimizer.learning_rates(), tokens, _packed_here(model)), optimizer.control)
    if parts is None:
        return PackedCount()
    record.node_seconds = slowest_per_node([times for times, _, _, _ in parts], model.valid.order)
    record.learning_rates = {node: rate for _, rates, _, _ in parts for node, rate in rates.items()}
    record.tokens = max((n for _, _, n, _ in parts if n is not None), default=0)
    monitor.record(record)
    return sum((p for _, _, _, p in parts), PackedCount())


def _packed_here(model) -> PackedCount:
    """What this rank's nodes packed since the last step; a tensor-parallel group's ranks pack the
    same rows, so only its first counts them (a packing node runs without pp and cp)."""
    rank, packed = dist.get_rank(), PackedCount()
    for node, builder in model.valid.builders.items():
        taken = builder.take_packed()
        layout = model.valid.layouts[node]
        if taken is not None and layout.coords(rank)["tp"] == 0:
            packed += taken
    return packed


def _message(monitor, line: str | None) -> None:
    if monitor is not None and line:
        monitor.message(line)


def _resume(checkpointer: Checkpointer, options: TrainOptions):
    """What the checkpoint restored (None when not loading)."""
    if not options.load:
        return None
    resumed = checkpointer.load(options.load)
    _print(f"resumed from {options.load} at step {resumed.step}"
           + "".join(f"\n  resharded: node '{n}' (placement differs)" for n in resumed.resharded)
           + "".join(f"\n  reset: {note}" for note in resumed.reset))
    return resumed


def _print(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def _tokens(batch) -> int | None:
    """Tokens in the global batch: the samples' own (``seq_lengths``) where the batch packs, else
    every ``input_ids`` slot; a rank's share of a packed batch scales its samples' count to the
    global batch (None where the share has neither)."""
    if isinstance(batch, RankBatch):
        lengths, ids = batch.rows.get(LENGTHS_PORT), batch.rows.get("input_ids")
        if lengths is not None:
            return round(int(lengths.sum()) * batch.size / lengths.shape[0])
        return None if ids is None else batch.size * ids.shape[1]
    if LENGTHS_PORT in batch:
        return int(batch[LENGTHS_PORT].sum())
    ids = batch.get("input_ids")
    return None if ids is None else ids.numel()
