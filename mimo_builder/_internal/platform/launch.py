"""Run a function on N ranks: under torchrun, or by spawning N local processes.

``launch(fn, nproc, *args)`` returns ``[fn(*args) on rank 0, ..., on rank N-1]`` when it spawns,
or ``[fn(*args)]`` for this rank under torchrun. The backend follows the device, as under
torchrun: NCCL with ``cuda:LOCAL_RANK`` where CUDA is available, gloo on CPU
(``MIMO_BUILDER_P2P=strict`` makes gloo's point-to-point keep NCCL's rules:
:mod:`mimo_builder._internal.platform.strict_p2p`). If any spawned rank raises, the other ranks are stopped at once
and :class:`RankError` carries the failing rank's number and traceback: a failure never turns
into a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue
import re
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimo_builder._internal.platform.attempts import rendezvous_store
from mimo_builder._internal.platform.compat import quiet_dependency_warnings, resolve_device
from mimo_builder._internal.platform.rank_server import (fork_context, launcher_output, under_torchrun,
                                                          write_where_the_launcher_does)
from mimo_builder._internal.errors import MimoError, Preempted
from mimo_builder._internal.platform.strict_p2p import BANNER, p2p_mode, p2p_timeout_s, strict_p2p

DEFAULT_INIT_TIMEOUT_S = 120.0
_POLL_S = 0.2
_GRACE_S = 1.0  # how long to wait for other ranks' reports after a failure


class LaunchError(MimoError, ValueError):
    """The ranks asked for cannot start on this machine (named before any is spawned)."""


class RankError(MimoError, RuntimeError):
    """A rank raised; carries its rank number and formatted traceback."""

    def __init__(self, rank: int, trace: str):
        self.rank = rank
        self.trace = trace
        super().__init__(f"rank {rank} failed:\n{trace}")


def default_backend() -> str:
    """NCCL when the ranks run on CUDA (``compat.resolve_device``), gloo otherwise. Node groups
    take this backend; the project's control groups are gloo on CPU tensors everywhere."""
    return "nccl" if resolve_device("auto").type == "cuda" else "gloo"


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    timeout_s: float | None = None,
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    backend: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` ranks with ``torch.distributed`` initialised.

    Under torchrun the current process is one rank (``nproc`` must equal WORLD_SIZE). Otherwise
    ``nproc`` processes are spawned (``fn`` and ``args`` must be picklable). ``timeout_s`` bounds
    the whole spawned run; ``init_timeout_s`` is the process-group timeout for collectives.
    """
    if nproc < 1:
        raise ValueError(f"launch: nproc must be >= 1, got {nproc}")
    backend = backend or default_backend()
    strict = p2p_mode() == "strict" and backend == "gloo"
    p2p_timeout_s()  # a bad MIMO_BUILDER_P2P_TIMEOUT is named here, not by every rank
    if strict and int(os.environ.get("RANK", "0")) == 0:
        print(BANNER, file=sys.stderr, flush=True)
    if under_torchrun():
        return [_run_here(fn, nproc, args, init_timeout_s, backend, strict)]
    check_devices(backend, nproc)
    return _spawn(fn, nproc, args, timeout_s, init_timeout_s, backend, strict)


def check_devices(backend: str, nproc: int) -> None:
    """NCCL ranks on one machine need a GPU each: name the shortfall before spawning."""
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise LaunchError(f"--nproc {nproc}: NCCL ranks need a GPU each, and this machine has "
                          f"{torch.cuda.device_count()}; run fewer ranks (--colocate puts every node on all "
                          f"of them), or launch with torchrun across machines")


def _run_here(fn, nproc, args, init_timeout_s, backend, strict):
    world = int(os.environ["WORLD_SIZE"])
    if world != nproc:
        raise ValueError(f"launch: nproc={nproc} but torchrun started WORLD_SIZE={world}")
    timeout = datetime.timedelta(seconds=init_timeout_s)
    _die_with(os.getppid())  # torchrun's agent: a killed agent must not leave its ranks training on
    if not dist.is_initialized():  # in this attempt's keys: a restarted job must not meet the last one's
        dist.init_process_group(backend, store=rendezvous_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=world, timeout=timeout, **_device_option(backend))
    if not strict:
        return fn(*args)
    with strict_p2p(rendezvous_store(timeout)):
        return fn(*args)


def _device_option(backend: str) -> dict:
    """NCCL: this rank's GPU (``cuda:LOCAL_RANK``, as torchrun numbers them), made current and
    bound to the default group (its communicator starts at once, on the right device)."""
    if backend != "nccl":
        return {}
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return {"device_id": device}


def _spawn(fn, nproc, args, timeout_s, init_timeout_s, backend, strict):
    # The parent owns the rendezvous store on a port the OS picks: no port races between tests.
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    ctx = _rank_context()
    results: queue.Queue = ctx.Queue()
    payload = pickle.dumps((fn, args, dict(os.environ)))
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, nproc, store.port, init_timeout_s, (backend, strict), payload, results, os.getpid(),
                  launcher_output()),
            daemon=False,  # a rank may start processes (DataLoader workers, checkpoint writers); it
            # still ends with the launcher (_die_with) and is killed after collection
        )
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    try:
        with _signals_reach_ranks(procs):
            values = _collect(procs, results, nproc, timeout_s, store)
    except BaseException:
        _kill(procs)
        raise
    for p in procs:
        p.join(timeout=10.0)
    _kill(procs)
    del store
    return values


def _rank_context():
    """Without a GPU, ranks fork from a server process that imported most of the stack once
    (:mod:`mimo_builder._internal.platform.preload`): a fresh process per rank, as with "spawn", without importing
    torch again each time. With a GPU, "spawn": importing torch's compiler stack there queries
    the device, after which torch refuses CUDA in forked children."""
    import torch

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    return fork_context()  # already running when the command started it (rank_server.start_early)


def _rank_main(rank, nproc, port, init_timeout_s, mode, payload, results, launcher, descriptors):
    os.setpgid(0, 0)  # the rank leads a process group: ending it ends what it started (checkpoint writers)
    write_where_the_launcher_does(descriptors)
    _die_with(launcher)
    quiet_dependency_warnings()  # before unpickling fn/args imports MCore
    backend, strict = mode
    try:
        fn, args, environment = pickle.loads(payload)
        os.environ.clear()  # the launcher's environment now, not the fork server's (its folder: multiprocessing's)
        os.environ.update(environment)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        _share_cores(nproc)
        timeout = datetime.timedelta(seconds=init_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=nproc, timeout=timeout,
                                **_device_option(backend))
        with strict_p2p(dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)) if strict \
                else contextlib.nullcontext():
            # Plain pickle copies tensor data; the multiprocessing pickler would share storage
            # through file descriptors that die with this process.
            value = pickle.dumps(fn(*args))
        results.put((rank, True, value))
    except BaseException as err:  # report everything, including SystemExit and KeyboardInterrupt
        # a MimoError is a message for the user (bad input, a checkpoint that does not fit)
        report = _report(err)
        results.put((rank, False, report))
        return
    try:
        dist.barrier()  # keep every rank's groups alive until all are done
        dist.destroy_process_group()
    except Exception:
        pass


TRACEBACK_VARIABLE = "MIMO_BUILDER_TRACEBACK"
"""Set to 1 (``mimo-builder --traceback``): a rank's failure comes with its full traceback."""


_PREEMPTED = f"{Preempted.__name__}: "


def _report(err: BaseException) -> str:
    """A rank's failure as the launcher shows it: a MimoError's message (what the user must fix),
    anything else with its traceback; with ``MIMO_BUILDER_TRACEBACK=1`` every failure with the
    traceback of where it was raised (a step's: the node's own code, e.g. a user's ``forward``)."""
    if isinstance(err, Preempted) or (isinstance(err, MimoError) and os.environ.get(TRACEBACK_VARIABLE) != "1"):
        return f"{type(err).__name__}: {err}"
    where = getattr(err, "trace", "")  # a StepError carries the failing rank's own traceback
    return (f"{where}\n" if where else "") + traceback.format_exc()


def _share_cores(nproc: int) -> None:
    """Give each of the ``nproc`` ranks on this machine its share of the cores for torch's
    intra-op threads (as torchrun does), unless OMP_NUM_THREADS says otherwise: N ranks with a
    thread per core each would contend for every core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))


def _collect(procs, results, nproc, timeout_s, store):
    values: dict[int, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(values) < nproc:
        try:
            rank, ok, payload = results.get(timeout=_POLL_S)
        except queue.Empty:
            if _dead_ranks(procs, values):
                _raise_root_cause(procs, results, values, {}, store)
            if deadline is not None and time.monotonic() > deadline:
                missing = sorted(set(range(nproc)) - set(values))
                raise RankError(missing[0], f"timed out after {timeout_s:.0f}s; ranks {missing} unfinished")
            continue
        if not ok and not payload.startswith(_PREEMPTED):
            _raise_root_cause(procs, results, values, {rank: payload}, store)
        values[rank] = payload
    stopped = [v for v in values.values() if isinstance(v, str)]
    if stopped:  # every rank stopped after the same step (they agreed): the run was preempted
        raise Preempted(stopped[0].removeprefix(_PREEMPTED))
    return [pickle.loads(values[r]) for r in range(nproc)]


def _dead_ranks(procs, done) -> dict[int, str]:
    # A rank that exits normally has queued its report first; a non-zero exit never reports.
    return {
        rank: f"process {_how_it_ended(p.exitcode)} without reporting"
        for rank, p in enumerate(procs)
        if rank not in done and p.exitcode not in (None, 0)
    }


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _died_on_its_own(procs, dead: dict[int, str]) -> dict[int, str]:
    """The dead ranks that no watchdog ended (killed, crashed): a cause, not a consequence."""
    from mimo_builder._internal.runtime.guard import EXIT_ABANDONED

    return {rank: why for rank, why in dead.items() if procs[rank].exitcode != EXIT_ABANDONED}


def _raise_root_cause(procs, results, done, failures, store):
    """Wait briefly for the other reports, then raise for the rank most likely at fault.

    A failure the ranks published in the store (:mod:`mimo_builder._internal.runtime.guard`) names the
    root cause. Otherwise: a peer's death makes the healthy ranks fail in their collectives
    too; a rank that died without reporting, else the first rank that reported, is the cause.
    """
    grace_end = time.monotonic() + _GRACE_S
    while time.monotonic() < grace_end:
        try:
            rank, ok, payload = results.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if not ok:
            failures.setdefault(rank, payload)
    dead = _dead_ranks(procs, set(done) | set(failures))
    killed = _died_on_its_own(procs, dead)
    published = _published_failure(store)
    if killed:  # a rank killed or crashed: its peers' published errors (connection lost) follow from it
        cause = min(killed)
        context = f"\n(what the others saw: {published[1]})" if published is not None else ""
        raise RankError(cause, f"rank {cause} {killed[cause][len('process '):]}" + context
                        + _also_failed(set(failures) | set(dead), cause))
    # a published cause explains ranks that died unreported (their watchdog ended them) or that
    # report it; an older published failure (caught, then rebuilt) does not explain a new one
    if published is not None and (dead or any(published[1] in str(f) for f in failures.values())):
        rank, message = published
        if os.environ.get(TRACEBACK_VARIABLE) == "1" and rank in failures:
            message = failures[rank]  # the rank's own report: the published cause with its traceback
        raise RankError(rank, message + _also_failed(set(failures) | set(dead), rank))
    cause = min(dead) if dead else next(iter(failures))
    trace = {**failures, **dead}[cause]
    raise RankError(cause, trace + _also_failed(set(failures) | set(dead), cause))


def _also_failed(ranks: set[int], cause: int) -> str:
    others = sorted(ranks - {cause})
    return f"\n(ranks {others} failed too, most likely as a consequence)" if others else ""


def _published_failure(store) -> tuple[int, str] | None:
    """The root cause a rank published, with the rank it names (read without blocking)."""
    from mimo_builder._internal.runtime.guard import FAILURE_KEY

    if not store.check([FAILURE_KEY]):
        return None
    message = store.get(FAILURE_KEY).decode()
    match = re.search(r"rank (\d+)", message)
    return (int(match.group(1)) if match else 0), message


@contextlib.contextmanager
def _signals_reach_ranks(procs):
    """While ranks run, SIGTERM or SIGUSR1 to this process is passed on to them: a training rank
    stops after its step (saving, with --save; :mod:`mimo_builder._internal.runtime.preemption`),
    any other rank ends. A second SIGTERM stops them at once, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def forward(signum, frame):
        if received and signum == signal.SIGTERM:
            raise SystemExit(128 + signum)
        received.append(signum)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _die_with(launcher: int) -> None:
    """End this rank when its launcher (or torchrun agent) ends, even when it is killed (a
    spawned rank's parent is the fork server, so the parent-death signal would watch the wrong
    process)."""
    threading.Thread(target=_exit_after, args=(launcher,), name="mimo-launcher-watch", daemon=True).start()


def _exit_after(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)  # Linux: wakes the moment the process ends
        select.select([handle], [], [])
    except (AttributeError, OSError):  # elsewhere, or already gone
        while _alive(pid):
            time.sleep(0.5)
    if os.getpgrp() == os.getpid():  # a rank spawned here leads its group: it and its helpers
        os.killpg(os.getpgrp(), signal.SIGKILL)
    print(f"mimo-builder: rank {os.environ.get('RANK', '?')} stops: its launcher (pid {pid}) is gone",
          file=sys.stderr, flush=True)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(procs):
    """End every rank and the processes it started (each rank leads its process group:
    MCore's checkpoint writer starts a helper per rank that outlives a killed rank otherwise)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()
