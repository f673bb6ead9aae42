"""The checkpoint writer's result queue, served by a process that dies with its rank.

Megatron-Core's ``FileSystemWriterAsync`` collects its writers' results through a queue of a
``multiprocessing`` Manager, a server process it starts on the first save. A rank killed by
SIGKILL (a crash, the OOM killer, a test of restarts) leaves that server and its resource tracker
running forever. Here the server asks Linux for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).

The server is forked from the rank, whatever start method MCore names: spawned, it started
without torch and imported it to unpickle the first results, and the first save of every rank
waited on it (4.6 s of a 4.7 s save here). Forked, it has torch already and touches no device.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Run in the server process: end it when ``parent`` ends (at once if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class WriterQueue:
    """A replacement for ``get_write_results_queue``: one queue per process, made on first use."""

    def __init__(self):
        self.queue = None
        self.manager: SyncManager | None = None

    def __call__(self, mp_mode: str = "spawn"):
        """The queue (MCore's signature; its start method ``mp_mode`` gives way to "fork", above)."""
        if self.queue is None:
            self.manager = SyncManager(ctx=mp.get_context("fork"))
            self.manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
            self.queue = self.manager.Queue()
        return self.queue
