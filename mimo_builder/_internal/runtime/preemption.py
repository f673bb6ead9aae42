"""Preemption: SIGTERM or SIGUSR1 (Slurm's ``--signal=USR1@90``) asks a run to stop after its step.

Each rank notes the signal in a :class:`PreemptionSignals` while it trains; after every step the
ranks agree (one tiny all-reduce on the control group) whether any of them got one, so all stop
after the same step; the same all-reduce carries rank 0's word that a save is due by wall time
(``--save-interval-minutes``). The loop then saves (with ``--save``) and raises :class:`Preempted`; the
command exits with :data:`EXIT_PREEMPTED` (85), and ``run --save DIR --resume`` continues exactly.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from mimo_builder._internal.errors import EXIT_PREEMPTED, Preempted  # noqa: F401 (public here too)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Catches SIGTERM and SIGUSR1 in this rank's main thread for the block it is used in (the
    previous handlers come back after); :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in PREEMPTION_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agree(self, group: dist.ProcessGroup, save_due: bool = False) -> tuple[str | None, bool]:
        """Collective over ``group`` after a step: the signal's name if any rank got one (else
        None), and whether any rank found a save due (``save_due``: rank 0's wall clock)."""
        code = 0 if self.received is None else PREEMPTION_SIGNALS.index(signal.Signals[self.received]) + 1
        flags = torch.tensor([code, int(save_due)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        code, due = (int(f) for f in flags)
        return (PREEMPTION_SIGNALS[code - 1].name if code else None), bool(due)


class SaveClock:
    """``--save-interval-minutes``: a save is due once that much wall time passed since the last
    save (or the start). Only rank 0's clock counts (:meth:`PreemptionSignals.agree` shares it)."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        """True when a save is due by wall time on this rank (never without an interval)."""
        return self.seconds is not None and dist.get_rank() == 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        """A save just finished: the interval starts again."""
        self.last = time.monotonic()
