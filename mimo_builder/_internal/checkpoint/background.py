"""Checkpoint saves written in the background while training goes on (``run --async-save``).

Megatron-Core's async save does the work: ``dist_checkpointing.save(..., async_sharded_save=True)``
plans the save on every rank (collectives, now) and returns a request; its ``preload_fn`` stages
the tensors in host memory and its ``async_fn`` writes them. MCore's ``AsyncCallsQueue`` orders
the requests and finalizes one when every rank's write is done (one small all-reduce per poll, at
the same point of every rank's loop): MCore's finalize functions write the checkpoint's metadata,
then the project's commit publishes the step (manifest, ``latest``). A step folder is complete or
absent, as after a blocking save.

What runs the write is the project's own :class:`WriterThread`, not one of MCore's callers: its
temporal caller forks the rank, and every page the rank then writes is copied (measured: steps
1.25x slower while a forked child merely lives, 1.40x with its write); its persistent caller is a
spawned worker that sets a CUDA device and, on CPU, would read the live tensors. Here the staged
tensors are copies taken at the save's step (on GPU the device-to-host copy; on CPU a clone, since
staging a host tensor on the host copies nothing), written by a thread at the lowest CPU priority,
so it takes the cores the ranks leave idle.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest

WRITER_NICENESS = 19
"""The writer thread's CPU niceness (Linux: per thread)."""


class WriterThread(AsyncCaller):
    """Runs one request's write in a thread of the rank, on copies of the tensors."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        """Stage (copy) the request's tensors now, then start its write in a thread."""
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn is not None:
            args[1] = _owned(async_req.preload_fn(), _storages(args[1]))
        self.thread = threading.Thread(target=self._write, args=(async_req, args), name="checkpoint-writer",
                                       daemon=True)
        self.thread.start()

    def _write(self, request: AsyncRequest, args: list) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
            request.async_fn(*args, **request.async_fn_kwargs)
        except BaseException as err:  # reported by is_current_async_call_done on this rank
            self.error = err

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """Whether every rank's write is done (waiting for this rank's with ``blocking``); one
        all-reduce over the ranks unless ``no_dist``."""
        if blocking and self.thread is not None:
            self.thread.join()
        alive = int(self.thread is not None and self.thread.is_alive())
        done = not alive if no_dist else self.sync_all_async_calls(alive)
        if done:
            self.close()
        return done

    def close(self, abort: bool = False) -> None:
        """Forget the finished write (raising its error); ``abort``: do not wait for it."""
        thread, self.thread = self.thread, None
        if thread is not None and not abort:
            thread.join()
        error, self.error = self.error, None
        if error is not None and not abort:
            raise error


class _ThreadedCalls(AsyncCallsQueue):
    """MCore's queue of async calls, each run by a :class:`WriterThread`."""

    def _get_async_caller(self):
        return WriterThread()


def _storages(buckets: list) -> set[int]:
    """The data pointers of the tensors a request's write buckets hold (the model's own)."""
    return {tensor.data_ptr() for _, _, (_, tensor_data) in buckets for _, tensor in tensor_data}


def _owned(staged: list, model: set[int]) -> list:
    """The staged write buckets with every tensor that still is the model's (staging a host
    tensor on the host copies nothing) replaced by a copy."""
    out = []
    for file_name, storage_key, (bytes_data, tensor_data) in staged:
        tensors = [(item, tensor.clone() if tensor.data_ptr() in model else tensor) for item, tensor in tensor_data]
        out.append((file_name, storage_key, (bytes_data, tensors)))
    return out


class BackgroundSaves:
    """The saves of one rank still being written, each published by its commit when done."""

    def __init__(self):
        self.queue = _ThreadedCalls()
        self.pending: dict[int, list[Path]] = {}  # call -> [its step folder, once committed]

    def start(self, request: AsyncRequest, commit: Callable[[], Path]) -> None:
        """Stage ``request``'s tensors and start its write (every rank together); ``commit``
        runs on every rank once all writes are done and returns the step folder."""
        folder: list[Path] = []
        request.add_finalize_fn(lambda: folder.append(commit()))
        call = self.queue.schedule_async_request(request)
        self.pending[call] = folder

    def finish(self, wait: bool) -> list[Path]:
        """The step folders published now: the saves whose writes are done on every rank (all
        of them, waiting, with ``wait``). Every rank calls it at the same point."""
        if not self.pending:
            return []
        done = self.queue.maybe_finalize_async_calls(blocking=wait)
        return [self.pending.pop(call)[0] for call in done]

    @property
    def busy(self) -> bool:
        """Whether a save is still being written."""
        return bool(self.pending)

    def abort(self) -> None:
        """Give up the writes (a failed run): their step folders stay unpublished."""
        self.queue.close(abort=True)
        self.pending.clear()

