"""NCCL's point-to-point rules enforced on gloo: ``MIMO_BUILDER_P2P=strict``.

gloo buffers a send until its receiver takes it and lets every call proceed on its own, so a
pattern that deadlocks on NCCL (two ranks that each send before they receive) passes on gloo.
Under strict mode every point-to-point call of a gloo rank (``isend``, ``irecv``, ``send``,
``recv``, ``batch_isend_irecv``) goes through one engine thread per process that behaves as an
NCCL stream does:

- **rendezvous**: a send completes only once its receiver has posted the matching receive (the
  receiver announces it in the rendezvous store; the sender waits for that before sending);
- **no tags**: tags are ignored, messages match by order alone;
- **per-pair FIFO**: the n-th send from A to B meets the n-th receive on B from A;
- **issue order**: a rank's sends and receives complete in the order it issued them; a
  ``batch_isend_irecv`` list is one unit whose operations progress together (an NCCL group).

A wait that NCCL would never end raises :class:`StrictP2PError` after ``timeout_s``, naming
the ranks, instead of hanging. The host thread stays asynchronous, as with NCCL: ``isend`` and
``irecv`` return at once and ``wait()`` blocks.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from mimo_builder._internal.errors import ConfigError, MimoError
from mimo_builder._internal.platform.patching import Patches

MODE_VARIABLE = "MIMO_BUILDER_P2P"
TIMEOUT_VARIABLE = "MIMO_BUILDER_P2P_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
BANNER = "strict P2P: point-to-point on gloo follows NCCL's rules (rendezvous, no tags, issue order)"
_SEND, _RECV = "send", "recv"
_ORIGINALS = {name: getattr(c10d, name) for name in ("isend", "irecv", "send", "recv", "batch_isend_irecv")}


class StrictP2PError(MimoError, RuntimeError):
    """A point-to-point operation that NCCL would leave waiting forever."""


def p2p_mode() -> str | None:
    """``"strict"`` when ``MIMO_BUILDER_P2P`` asks for it, None when unset; anything else is an error."""
    value = os.environ.get(MODE_VARIABLE, "").strip()
    if value in ("", "gloo", "default"):
        return None
    if value != "strict":
        raise ConfigError(f"{MODE_VARIABLE}={value!r}: the only mode is 'strict' (NCCL's point-to-point "
                          f"rules on gloo); unset it for plain gloo")
    return value


def p2p_timeout_s() -> float:
    """Seconds a strict send waits for its receive (``MIMO_BUILDER_P2P_TIMEOUT``, default 60)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{TIMEOUT_VARIABLE}={text!r}: must be a positive number of seconds")
    return value


@dataclass(eq=False)
class _Op:
    kind: str
    tensor: torch.Tensor
    peer: int  # global rank
    group: object
    key: str  # rendezvous key of this message: group, pair and sequence number

    def describe(self, rank: int) -> str:
        size = self.tensor.numel() * self.tensor.element_size()
        if self.kind == _SEND:
            return f"rank {rank}'s send of {size} bytes to rank {self.peer}"
        return f"rank {rank}'s receive of {size} bytes from rank {self.peer}"


class StrictWork:
    """What a strict call returns: done once the engine has completed its unit."""

    def __init__(self, source: int | None = None):
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.source = source

    def wait(self, timeout=None) -> bool:
        """Block until the unit is done (``timeout`` is ignored); re-raise its error, else return True."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        """Whether the unit is done, successfully or not."""
        return self._done.is_set()

    def exception(self):
        """The error the unit finished with; None while running or after success."""
        return self._error

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()


@dataclass
class _Engine:
    """One process's point-to-point engine: units run one after another, in issue order."""

    store: object
    timeout_s: float
    rank: int = field(default_factory=dist.get_rank)
    sequence: dict = field(default_factory=lambda: defaultdict(itertools.count))
    failed: BaseException | None = None

    def __post_init__(self):
        self.units: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="mimo-strict-p2p", daemon=True)
        self.thread.start()

    def submit(self, ops: list[_Op]) -> StrictWork:
        work = StrictWork()
        self.units.put((ops, work))
        return work

    def op(self, kind: str, tensor: torch.Tensor, peer: int, group) -> _Op:
        """An operation with its rendezvous key (sequence numbers per group and ordered pair)."""
        if peer is None:
            raise StrictP2PError(f"strict P2P: rank {self.rank} receives from any source (src=None), which "
                                 "NCCL cannot do; name the sending rank")
        group = group or dist.group.WORLD
        src, dst = (self.rank, peer) if kind == _SEND else (peer, self.rank)
        pair = (group.group_name, src, dst)
        return _Op(kind, tensor, peer, group, f"{pair[0]}/{src}>{dst}/{next(self.sequence[pair])}")

    def close(self) -> None:
        self.units.put(None)

    def _serve(self) -> None:
        while (unit := self.units.get()) is not None:
            ops, work = unit
            if self.failed is not None:
                work._finish(self.failed)
                continue
            try:
                self._run(ops)
                work._finish()
            except BaseException as err:  # the rank is broken: every later unit fails the same way
                self.failed = err
                work._finish(err)

    def _run(self, ops: list[_Op]) -> None:
        deadline = time.monotonic() + self.timeout_s
        recvs = [op for op in ops if op.kind == _RECV]
        for op in recvs:  # posted: the senders may go
            self.store.set(op.key, b"1")
        works = [(_ORIGINALS["irecv"](op.tensor, op.peer, group=op.group), op) for op in recvs]
        pending, pause = [op for op in ops if op.kind == _SEND], 0.0002
        while pending:
            pause = self._await_first(pending[0], deadline, pause)
            for op in self._posted(pending):
                self.store.delete_key(op.key)
                works.append((_ORIGINALS["isend"](op.tensor.contiguous(), op.peer, group=op.group), op))
                pending.remove(op)
        for work, op in works:
            left = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(datetime.timedelta(seconds=left))
            except RuntimeError as err:
                raise StrictP2PError(f"strict P2P: {op.describe(self.rank)} did not complete in "
                                     f"{self.timeout_s:g} s ({err})") from None

    def _posted(self, pending: list[_Op]) -> list[_Op]:
        """The sends whose receives are posted, each pair's in order (a later message to a peer
        never overtakes an earlier one)."""
        ready, blocked = [], set()
        for op in pending:
            pair = (op.group.group_name, op.peer)
            if pair not in blocked and self.store.check([op.key]):
                ready.append(op)
            else:
                blocked.add(pair)
        return ready

    def _await_first(self, op: _Op, deadline: float, pause: float) -> float:
        """Pause until the receive of ``op`` may be posted; past the deadline, name the deadlock.
        Returns the next pause (polling backs off to 5 ms)."""
        if time.monotonic() > deadline:
            raise StrictP2PError(
                f"strict P2P: {op.describe(self.rank)} found no matching receive in {self.timeout_s:g} s. "
                f"On NCCL it would wait forever: rank {op.peer} must post that receive before it waits for "
                f"anything rank {self.rank} sends later (e.g. batch both with batch_isend_irecv)")
        if not self.store.check([op.key]):
            time.sleep(pause)
        return min(pause * 2, 0.005)


class _StrictCalls:
    """The replacements of torch.distributed's point-to-point functions, bound to one engine."""

    def __init__(self, engine: _Engine):
        self.engine = engine

    def isend(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        return self.engine.submit([self._op(_SEND, tensor, dst, group, group_dst)])

    def irecv(self, tensor, src=None, group=None, tag=0, group_src=None):
        op = self._op(_RECV, tensor, src, group, group_src)
        work = self.engine.submit([op])
        work.source = op.peer
        return work

    def send(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        self.isend(tensor, dst, group, tag, group_dst).wait()

    def recv(self, tensor, src=None, group=None, tag=0, group_src=None):
        work = self.irecv(tensor, src, group, tag, group_src)
        work.wait()
        return work.source

    def batch_isend_irecv(self, p2p_op_list):
        if not p2p_op_list:
            return []
        ops = [self._op(_SEND if p.op in (self.isend, _ORIGINALS["isend"]) else _RECV, p.tensor, p.peer, p.group,
                        p.group_peer) for p in p2p_op_list]
        return [self.engine.submit(ops)]  # one NCCL group: one work completes them all

    def _op(self, kind, tensor, peer, group, group_peer) -> _Op:
        if group_peer is not None:
            peer = dist.get_global_rank(group or dist.group.WORLD, group_peer)
        return self.engine.op(kind, tensor, peer, group)


@contextlib.contextmanager
def strict_p2p(store, timeout_s: float | None = None) -> Iterator[None]:
    """Enforce NCCL's point-to-point rules on this process's gloo calls for the scope.

    ``store``: a rendezvous store every rank reaches (its own client: the engine thread uses it).
    """
    engine = _Engine(dist.PrefixStore("mimo-strict-p2p", store), timeout_s or p2p_timeout_s())
    calls = _StrictCalls(engine)
    patches = Patches()
    for module in (dist, c10d):  # torch.distributed re-exports the c10d functions
        for name in _ORIGINALS:
            patches.patch(module, name, getattr(calls, name))
    try:
        yield
    finally:
        patches.undo()
        engine.close()
