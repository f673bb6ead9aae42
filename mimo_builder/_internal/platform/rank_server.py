"""The fork server that ranks start from on a machine without a GPU, started as soon as a
command knows it will launch ranks.

Without a GPU, ranks fork from a server process that imported the stack once
(:mod:`mimo_builder._internal.platform.preload`, about 6 s on this project's 2-core machine).
Started when the first rank starts, that import is a wait after the command's own validation,
which imports the same stack (about 7 s); started when the command begins, the two imports run
side by side. A command that ends early (a named error) stops the server with it.

This module imports neither torch nor Megatron-Core: it runs before them.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from multiprocessing import forkserver
from multiprocessing.reduction import DupFd

from mimo_builder._internal.platform.fusions import gpu_device_present

PRELOAD = ["mimo_builder._internal.platform.preload"]


def under_torchrun() -> bool:
    """True when the torchrun/elastic environment variables describe this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def fork_context():
    """The multiprocessing context whose server preloads the stack."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_early() -> bool:
    """Start the fork server now when this machine shows no GPU device file (where one exists,
    ranks may be spawned instead: ``launch._rank_context`` asks torch) and this process is not one
    of torchrun's ranks; True when started. The server ends with this process."""
    if under_torchrun() or gpu_device_present():
        return False
    fork_context()
    forkserver.ensure_running()
    atexit.unregister(_stop)  # once however many commands this process runs
    atexit.register(_stop, forkserver._forkserver)
    return True


def launcher_output() -> list:
    """The launcher's stdout and stderr as they are now, to pass to a rank (None where closed)."""
    return [DupFd(fd) if _is_open(fd) else None for fd in (1, 2)]


def write_where_the_launcher_does(descriptors) -> None:
    """In a rank: point stdout and stderr where the launcher's pointed at launch (:func:`launcher_output`).
    A rank forked from the server would otherwise write where they pointed when the server
    started (a test capturing a run's output, a program that redirected its own since)."""
    for target, descriptor in zip((1, 2), descriptors):
        if descriptor is not None:
            fd = descriptor.detach()
            os.dup2(fd, target)
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _stop(server) -> None:
    """End the server now: after a named error it may still be importing, and would only notice
    this process's end when done. Ranks it forked lead their own process groups and are not
    touched. (The server's pid is kept only privately by multiprocessing.)"""
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
