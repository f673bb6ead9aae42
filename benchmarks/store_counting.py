"""Counting one rank's requests to the job's TCPStore in a real run (the benchmark's and the tests').

:class:`CountingStore` wraps the real store client of a built model's step guard and counts each
call by method and by thread (the main thread: schedule and optimizer; any other: the watchdog);
every call still goes to the real store. :func:`count_steps` runs the ``vlm`` graph on gloo
ranks and reports, per microbatch count, the main thread's requests per step and the watchdog's
requests per poll and per second.
"""

from __future__ import annotations

import collections
import threading
import time

BATCH = 8


class CountingStore:
    """A store client's stand-in that counts every call (method, thread) and forwards it."""

    def __init__(self, store):
        self.store = store
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            where = "main" if threading.current_thread() is threading.main_thread() else "watchdog"
            with self._lock:
                self.counts[(where, name)] += 1
            return attr(*args, **kwargs)
        return counted

    def take(self) -> collections.Counter:
        """The counts since the last take (or since wrapping), then start again from zero."""
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts


def _build(placement: str):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm(placement), seed=1).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    return model, GraphSchedule(model), GraphOptimizer(model, total_steps=1000)


def _summary(counts: collections.Counter, steps: int, elapsed: float, interval_s: float) -> dict:
    main = {k: n for (where, k), n in counts.items() if where == "main"}
    watchdog = {k: n for (where, k), n in counts.items() if where == "watchdog"}
    polls = max(watchdog.get("set", 0), 1)  # the watchdog sets its beat once per poll
    return dict(main_per_step=sum(main.values()) / steps, main_kinds=main,
                watchdog_per_s=sum(watchdog.values()) / elapsed, watchdog_per_poll=sum(watchdog.values()) / polls,
                watchdog_kinds=watchdog, interval_s=interval_s, elapsed_s=elapsed)


def count_rank(placement: str, microbatches: tuple[int, ...], steps: int) -> dict[int, dict]:
    """On one rank (all ranks run it): build, take a warm-up step, then for each microbatch count
    one untimed and ``steps`` counted training steps; returns :func:`_summary` per count."""
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model, schedule, optimizer = _build(placement)
    guard = model.guard
    counter = CountingStore(guard.store)
    guard.store = counter
    interval_s = getattr(guard, "interval_s", guard.poll_s)
    batch = synthetic_batch(model.valid, BATCH, seed=3)

    def step(m: int) -> None:
        optimizer.zero_grad()
        optimizer.step(schedule.forward_backward(batch, m))

    out = {}
    with model:
        for m in microbatches:
            step(m)
            counter.take()
            start = time.monotonic()
            for _ in range(steps):
                step(m)
            out[m] = _summary(counter.take(), steps, time.monotonic() - start, interval_s)
    return out


def count_steps(placement: str, microbatches: tuple[int, ...], steps: int, nproc: int = 2) -> dict[int, dict]:
    """:func:`count_rank` on ``nproc`` spawned gloo ranks; rank 0's figures."""
    from mimo_builder._internal.platform.launch import launch

    return launch(count_rank, nproc, placement, microbatches, steps, timeout_s=600)[0]
