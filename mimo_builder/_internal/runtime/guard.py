"""Failures and stalls of a built graph's steps, made known to every rank.

A rank that fails publishes the cause in the job's store (the first failure of a step wins, so
every rank reports the same root cause). A watchdog thread on every rank then looks after the
rank's main thread: if it stays blocked in a step after a peer failed, or a step makes no
progress for ``step_timeout_s``, the watchdog names the cause (for a stall: the ranks that went
silent, from each rank's last heartbeat) and ends the process. A blocked gloo or NCCL wait
cannot be interrupted from Python, only abandoned; the launcher (or torchrun) then stops the
other ranks and reports the published cause.

The store is one process for the whole job, so the guard's steady load on it is bounded: a step
makes no request (a note stays in the rank's memory, :mod:`~mimo_builder._internal.runtime.board`),
and each watchdog makes two per poll (its beat, a fire-and-forget set, and one compare_set that
reads the step's failure key), polling every :func:`poll_interval_s`: 0.5 s up to 1,024 ranks,
then longer so that the whole job stays near :data:`POLLS_PER_S` polls per second. The price of a
longer interval at scale: a peer's failure is seen up to one interval later, a stall report waits
three intervals to tell silent ranks from live ones, and a stopped rank's position is what its
watchdog last published, up to one interval old (exact when read by a peer on its host).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo_builder._internal.placement import release
from mimo_builder._internal.platform import private
from mimo_builder._internal.platform.attempts import scoped
from mimo_builder._internal.runtime.board import NoteBoard, read_note

FAILURE_KEY = "mimo_builder/failure"
"""The job's latest published root cause (read by :mod:`mimo_builder._internal.platform.launch`)."""
EXIT_ABANDONED = 75
"""Exit status of a rank whose watchdog ended it (blocked behind a failed or silent peer)."""
PHASES = ("forward_backward", "optimizer", "checkpoint")  # in the order a step runs them
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""What gloo says when a peer's process is gone."""
POLLS_PER_S = 2048
"""The whole job's watchdog polls per second (two store requests each) that the interval keeps to."""
MAX_POLL_S = 10.0
"""The longest poll interval: past ``POLLS_PER_S x MAX_POLL_S`` ranks the job's load grows again."""
_ABSENT = "\x01"
"""compare_set(key, _ABSENT, _ABSENT) returns the key's value, or this if there is none: one
request that reads a key which may not exist (check, then get, is two)."""


def poll_interval_s(world_size: int, poll_s: float = 0.5) -> float:
    """Seconds between a watchdog's polls at ``world_size`` ranks: ``poll_s``, or longer where the
    job's ranks would poll more than :data:`POLLS_PER_S` times a second, up to :data:`MAX_POLL_S`."""
    return max(poll_s, min(MAX_POLL_S, world_size / POLLS_PER_S))


def job_store() -> dist.Store:
    """A client of the job's rendezvous store (MASTER_ADDR/MASTER_PORT, as torchrun and the
    launcher set them) without torch's per-group key prefixes, so a launcher reads what ranks
    publish; else the default group's store."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if address and port:  # scoped to a torchrun attempt: a restart must not read the last one's failures
        return scoped(dist.TCPStore(address, int(port), is_master=False, timeout=datetime.timedelta(seconds=60)))
    return private.default_store()


@dataclass(frozen=True)
class _Active:
    step: int
    phase: str
    since: float
    timeout_s: float | None


class StepGuard:
    """One per built graph on every rank (all ranks create it together, with the same ``name``).

    ``step_timeout_s`` bounds each watched phase (None: no limit); ``grace_s`` is how long a
    rank may stay blocked after a peer published a failure of the same step; ``poll_s`` is the
    watchdog's interval in a small job (:func:`poll_interval_s` lengthens it in a large one).
    """

    def __init__(self, name: str, *, step_timeout_s: float | None = None,
                 first_step_timeout_s: float | None = None, grace_s: float = 10.0, poll_s: float = 0.5):
        self.store = job_store()
        self.group = dist.new_group(backend="gloo")  # for agree(): its own, never aborted
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.prefix = f"mimo_builder/guard/{name}"
        self.step_timeout_s = step_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self.grace_s, self.poll_s = grace_s, poll_s
        self.interval_s = poll_interval_s(self.world_size, poll_s)
        """Seconds between this rank's watchdog polls (the same on every rank of the job)."""
        self.board = NoteBoard(self._owner(self.rank))
        self._active: _Active | None = None
        self.detail = "building"
        self.step = 0
        self._tick = 0
        self._beat(None)  # at once (one request per build): a stall report finds every rank's beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"mimo-watchdog-{name}", daemon=True)
        self._thread.start()

    # --- the main thread ------------------------------------------------------------------------

    def begin_step(self) -> int:
        """Count a new step (every rank counts the same steps); returns its number."""
        self.step += 1
        return self.step

    @contextlib.contextmanager
    def watch(self, phase: str, timeout_s: float | None = None):
        """Mark this rank as inside ``phase`` of the current step until the block ends; the
        phase may last ``timeout_s`` (default: the step timeout; ``math.inf``: no limit)."""
        self._active = _Active(self.step, phase, time.monotonic(), timeout_s or self._step_limit())
        self.note(phase)
        try:
            yield
        finally:
            self._active = None
            self.note(self.detail)

    def note(self, detail: str) -> None:
        """What the main thread does now (shown when this rank is the one others wait for). No
        store request: it goes to this rank's note board (memory), and its watchdog publishes it
        with the next beat. A peer on this host reads the board itself, so a rank stopped right
        after a note (SIGSTOP, a debugger) is named with it there; a peer on another host names
        it with what its watchdog last published, up to one poll interval old."""
        self.detail = detail
        self.board.write(f"{_position(self._active)}|{detail}")

    def publish(self, message: str, step: int | None = None) -> str:
        """Record ``message`` as the step's failure unless another rank's came first; returns
        the failure every rank will report."""
        key = self._failure_key(self.step if step is None else step)
        first = self.store.compare_set(key, "", message).decode()
        if first == message:
            self.store.set(FAILURE_KEY, message)
        return first

    def publish_error(self, where: str, err: BaseException) -> str:
        """:meth:`publish` ``err`` as raised on this rank at ``where`` (a node and phase). A lost
        connection names the peers that stopped answering; a store that is gone says so."""
        message = f"rank {self.rank}, {where}: {type(err).__name__}: {err}"
        try:
            if any(sign in str(err) for sign in _PEER_LOST):
                message = self._peer_loss(message)
            return self.publish(message)
        except (RuntimeError, dist.DistError):  # the store went with the process that hosts it
            return (f"{message}\n(the job's store at {_store_address()} is unreachable: the process hosting "
                    "it, the launcher or the first torchrun agent, has stopped)")

    def _peer_loss(self, message: str) -> str:
        silent = [f"rank {r} {why}" for r, why in self.silent_ranks() if "not responding" in why]
        return f"{'; '.join(silent)} — most likely dead\n({message})" if silent else message

    def published(self, step: int) -> str | None:
        """The failure some rank published for ``step``, if any (does not block; one request)."""
        failure = self.store.compare_set(self._failure_key(step), _ABSENT, _ABSENT).decode()
        return None if failure == _ABSENT else failure

    def _step_limit(self) -> float | None:
        if self.step <= 1 and self.first_step_timeout_s is not None:  # kernels compile, caches warm
            return max(self.first_step_timeout_s, self.step_timeout_s or 0.0)
        return self.step_timeout_s

    @contextlib.contextmanager
    def publishing(self, where: str):
        """Publish an exception raised in the block as this rank's failure, then re-raise it."""
        try:
            yield
        except Exception as err:
            self.publish_error(where, err)
            raise

    def agree(self, failure: str | None) -> str | None:
        """Collective over all ranks: the step's published failure if any rank had one, else
        None. ``failure`` is this rank's (already published) failure or None."""
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not int(flag):
            return None
        return failure or self.store.get(self._failure_key(self.step)).decode()

    def close(self) -> None:
        """Stop the watchdog and release the agreement group (idempotent; no collective)."""
        release(self.group)
        self.group = None
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s)
        self.board.close()

    # --- the watchdog thread --------------------------------------------------------------------

    def _watch(self) -> None:
        try:
            self._watch_steps()
        except (RuntimeError, dist.DistError):  # the store went with the process that hosts it
            if not self._stop.is_set():
                self._abandon(f"the job's store at {_store_address()} is unreachable: the process hosting it, "
                              "the launcher or the first torchrun agent, has stopped")

    def _watch_steps(self) -> None:
        failure_seen: tuple[_Active, float] | None = None
        while not self._stop.wait(self.interval_s):
            active = self._active
            self._beat(active)
            if active is None:
                failure_seen = None
                continue
            failure = self.published(active.step)
            now = time.monotonic()
            if failure is not None:
                if failure_seen is None or failure_seen[0] is not active:
                    failure_seen = (active, now)
                elif now - failure_seen[1] > self.grace_s:
                    self._abandon(f"{failure}\n(rank {self.rank} stayed blocked in {active.phase} of step "
                                  f"{active.step} for {self.grace_s:.0f} s after that failure)")
            elif active.timeout_s is not None and now - active.since > active.timeout_s:  # inf: never
                self._abandon(self._report_stall(active))

    def _beat(self, active: _Active | None) -> None:
        """Publish this rank's liveness (a counter), where its note board is, and its position
        (one set: TCPStore answers none, so the watchdog does not wait for it)."""
        self._tick += 1
        beat = f"{self._tick}|{self.board.address}|{_position(active)}|{self.detail}"
        self.store.set(self._beat_key(self.rank), beat)

    def _report_stall(self, active: _Active) -> str:
        """The step's stall report. The first rank to claim the step reads every rank's beat and
        publishes it; the others keep beating (else they would look silent) until it appears.
        Every rank reading every beat at once would be O(ranks^2) requests on the store."""
        claim = self.store.compare_set(f"{self.prefix}/stall/{active.step}", "", str(self.rank)).decode()
        if claim != str(self.rank):
            for _ in range(8):  # the claimant's three intervals between its two reads, and margin
                self._stop.wait(self.interval_s)
                self._beat(self._active)
                failure = self.published(active.step)
                if failure is not None:
                    return failure
        return self.publish(self._stall(active), active.step)  # claimed, or the claimant went silent

    def _stall(self, active: _Active) -> str:
        silent = self.silent_ranks()
        who = "; ".join(f"rank {r} {why}" for r, why in silent) or "none (every rank waits: a collective is stuck)"
        return (f"step {active.step} made no progress in {active.phase} for {active.timeout_s:.0f} s "
                f"(step timeout); silent: {who}")

    def silent_ranks(self) -> list[tuple[int, str]]:
        """Ranks that do not answer (their watchdog stopped beating: stopped, hung or gone), else
        the ranks furthest behind in the step, each with what it last reported."""
        first = self._beats()
        for _ in range(3):  # keep beating meanwhile: the other ranks' watchdogs look at us too
            time.sleep(self.interval_s)
            self._beat(self._active)
        second = self._beats()
        quiet = [(r, f"is not responding (last reported: {_said(beat)})") for r, beat in second.items()
                 if beat[0] == first[r][0]]
        if quiet:
            return quiet
        positions = {r: beat[1] for r, beat in second.items() if beat[1][0] >= 0}
        if not positions:
            return []
        lowest = min(positions.values())
        return [(r, f"is behind ({_said(second[r])})") for r, p in positions.items() if p == lowest
                and p < max(positions.values())]

    def _beats(self) -> dict[int, tuple[str, tuple[int, int], str]]:
        """Every rank's beat (one multi_get while every key exists), its position and note read
        from its board where that is on this host (exact even if the rank is stopped)."""
        keys = [self._beat_key(rank) for rank in range(self.world_size)]
        if self.store.check(keys):
            values = dict(enumerate(self.store.multi_get(keys)))
        else:
            values = {rank: self.store.get(key) for rank, key in enumerate(keys) if self.store.check([key])}
        return {rank: _parsed(values.get(rank), self._owner(rank)) for rank in range(self.world_size)}

    def _abandon(self, message: str) -> None:
        print(f"mimo-builder: rank {self.rank} stopped by its watchdog: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_ABANDONED)

    def _failure_key(self, step: int) -> str:
        return f"{self.prefix}/failure/{step}"

    def _beat_key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _owner(self, rank: int) -> str:
        return f"{self.prefix}|{rank}"


def _position(active: _Active | None) -> str:
    """``step|phase index`` of a watched phase, ``-1|0`` outside steps."""
    if active is None:
        return "-1|0"
    return f"{active.step}|{PHASES.index(active.phase) if active.phase in PHASES else 0}"


def _parsed(beat: bytes | None, owner: str) -> tuple[str, tuple[int, int], str]:
    if beat is None:
        return "never", (-1, 0), "nothing: its watchdog never reported for this model"
    tick, board, rest = beat.decode().split("|", 2)
    step, phase, detail = (read_note(board, owner) or rest).split("|", 2)
    return tick, (int(step), int(phase)), detail


def _store_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _said(beat: tuple[str, tuple[int, int], str]) -> str:
    _, (step, _), detail = beat
    return f"step {step}, {detail}" if step >= 0 else detail
