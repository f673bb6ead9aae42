"""Watching training on rank 0: step lines, each node's time split, a progress bar, TensorBoard.

Every ``log_interval`` steps (and at the last one) rank 0 prints the interval's mean loss, grad
norm, throughput and step time, then each node's time per step split into forward / backward /
communication / optimizer (milliseconds, the node's slowest rank), and each node's throughput:
TFLOP/s per rank, MFU and tokens/s (:mod:`mimo_builder._internal.runtime.throughput`). On a terminal a
progress bar with the time left stays below the lines. With a TensorBoard folder, every step's
scalars are written there too (``tensorboard`` is an optional extra).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.runtime.throughput import NodeWork, graph_mfu, node_rates, throughput_line
from mimo_builder._internal.runtime.timing import PHASES

SHORT = {"forward": "fwd", "backward": "bwd", "communication": "comm", "optimizer": "opt"}


@dataclass
class StepRecord:
    """What one step did, as rank 0 sees it after gathering every rank's part."""

    step: int
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    node_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per node, per phase: seconds on the node's slowest rank."""
    learning_rates: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    nonfinite_nodes: tuple[str, ...] = ()


def auto_log_interval(steps: int) -> int:
    """About fifty step lines per run, every step for short runs."""
    return max(1, math.ceil(steps / 50))


def check_tensorboard() -> None:
    """Raise a named error when ``--tensorboard`` is asked for but the package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the 'tensorboard' package: pip install 'mimo-builder[tensorboard]'")


class TrainingMonitor:
    """Rank 0's display of a run from ``first_step`` to ``last_step``; use as a context manager.
    ``work``: each node's work per step (:func:`~mimo_builder._internal.runtime.throughput.graph_work`) on
    ``world_size`` ranks, for the throughput figures (None: none shown)."""

    def __init__(self, first_step: int, last_step: int, log_interval: int | None = None,
                 tensorboard: str | None = None, stream=None, work: dict[str, NodeWork] | None = None,
                 world_size: int = 1):
        self.last_step = last_step
        self.work, self.world_size = work, world_size
        self.log_interval = log_interval or auto_log_interval(last_step)
        self.stream = stream or sys.stdout
        self._pending: list[StepRecord] = []
        self._writer = _summary_writer(tensorboard) if tensorboard else None
        self._progress = _progress_bar(first_step, last_step, self.stream) if _is_terminal(self.stream) else None

    def __enter__(self) -> TrainingMonitor:
        if self._progress is not None:
            self._progress[0].start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self, record: StepRecord) -> None:
        """Take one step's record: TensorBoard now, a printed summary at the log interval."""
        self._pending.append(record)
        if self._writer is not None:
            _write_scalars(self._writer, record)
            if self.work:
                _write_throughput(self._writer, record, self.work, self.world_size)
        if self._progress is not None:
            progress, task = self._progress
            progress.update(task, completed=record.step, loss=f"loss {record.loss:.4f}")
        if record.step % self.log_interval == 0 or record.step == self.last_step:
            for line in summary_lines(self._pending, self.last_step):
                self.message(line)
            if self.work:
                n = len(self._pending)
                seconds, tokens = sum(r.seconds for r in self._pending) / n, sum(r.tokens for r in self._pending) // n
                self.message(throughput_line(self.work, self.world_size, seconds, tokens))
            self._pending = []

    def message(self, line: str) -> None:
        """Print a line for the user (above the progress bar when there is one)."""
        if self._progress is not None:
            self._progress[0].console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the progress bar and close the TensorBoard writer; calling it again does nothing."""
        if self._progress is not None:
            self._progress[0].stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def summary_lines(records: list[StepRecord], last_step: int) -> list[str]:
    """The printed summary of the steps since the last one: means over ``records``."""
    last, n = records[-1], len(records)
    seconds = sum(r.seconds for r in records)
    tokens = sum(r.tokens for r in records)
    finite = [r.loss for r in records if math.isfinite(r.loss)] or [last.loss]
    width = len(str(last_step))
    skipped = [r for r in records if r.skipped]
    note = ""
    if skipped:
        nodes = sorted({node for r in skipped for node in r.nonfinite_nodes})
        note = f" | skipped{f' {len(skipped)} steps' if n > 1 else ''}: non-finite {', '.join(nodes) or 'loss'}"
    lines = [f"step {last.step:>{width}}/{last_step} | loss {sum(finite) / len(finite):7.4f} | "
             f"grad norm {sum(r.grad_norm for r in records) / n:7.3f} | {tokens / seconds:8.0f} tokens/s | "
             f"{seconds / n * 1e3:6.0f} ms{note}"]
    if last.node_seconds:
        lines.append(_node_line(records))
    return lines


def _node_line(records: list[StepRecord]) -> str:
    n = len(records)
    parts = []
    for node in records[-1].node_seconds:
        per_phase = [sum(r.node_seconds.get(node, {}).get(p, 0.0) for r in records) / n * 1e3 for p in PHASES]
        parts.append(f"{node} {'/'.join(f'{ms:.0f}' for ms in per_phase)}")
    return f"    ms per step {'/'.join(SHORT[p] for p in PHASES)}: " + " | ".join(parts)


def _is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def _progress_bar(first_step: int, last_step: int, stream):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[loss]}"),
                        TextColumn("eta"), TimeRemainingColumn(), transient=True, console=Console(file=stream))
    task = progress.add_task("train", total=last_step, completed=first_step - 1, loss="")
    return progress, task


def _summary_writer(folder: str):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=folder)


def _write_scalars(writer, record: StepRecord) -> None:
    step = record.step
    writer.add_scalar("train/loss", record.loss, step)
    writer.add_scalar("train/grad_norm", record.grad_norm, step)
    writer.add_scalar("train/tokens_per_s", record.tokens / record.seconds, step)
    writer.add_scalar("train/step_time_ms", record.seconds * 1e3, step)
    writer.add_scalar("train/skipped", float(record.skipped), step)
    for node, rate in record.learning_rates.items():
        writer.add_scalar(f"lr/{node}", rate, step)
    for node, phases in record.node_seconds.items():
        for phase, seconds in phases.items():
            writer.add_scalar(f"time_ms/{node}/{phase}", seconds * 1e3, step)


def _write_throughput(writer, record: StepRecord, work: dict[str, NodeWork], world_size: int) -> None:
    step = record.step
    total = graph_mfu(work, world_size, record.seconds, record.tokens)
    if total is not None:
        writer.add_scalar("train/mfu", total, step)
    for node, rate in node_rates(work, record.seconds, record.tokens).items():
        writer.add_scalar(f"throughput/{node}/tokens_per_s", rate.tokens_per_s, step)
        if rate.tflops_per_rank is not None:
            writer.add_scalar(f"throughput/{node}/tflops_per_rank", rate.tflops_per_rank, step)
        if rate.mfu is not None:
            writer.add_scalar(f"throughput/{node}/mfu", rate.mfu, step)
