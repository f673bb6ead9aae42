"""Processes a test run leaves behind: found and ended by conftest's end-of-session check.

A process counts when it descends from the test process, alive (not a zombie), unless it is one of
multiprocessing's helpers that the test process itself started (the fork server of
``mimo_builder._internal.platform.launch`` and the resource tracker): those live as long as the test process by
design. What they fork (ranks carry the fork server's command line) counts. The test process
adopts orphans (``adopt_orphans``), so a process whose parent died (a rank's writer after the rank
was killed) is still its descendant.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import psutil

HELPERS = ("from multiprocessing.forkserver import main", "from multiprocessing.resource_tracker import main")
_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the parent of its descendants' orphans (Linux); False where it cannot."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def own_helpers() -> set[int]:
    """Pids of the fork server and resource tracker that multiprocessing started for this process."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    return pids - {None}


def leftovers(root: psutil.Process | None = None, skip: Callable[[str], bool] = lambda cmdline: False,
              helpers: set[int] | None = None) -> list[psutil.Process]:
    """Live descendants of ``root`` (default: this process) but its multiprocessing helpers and what ``skip`` takes."""
    # a helper: a child of root with a helper's command line and, for this process, one it started
    if root is None:
        root, helpers = psutil.Process(), own_helpers() if helpers is None else helpers
    found: list[psutil.Process] = []

    def walk(parent: psutil.Process, depth: int) -> None:
        try:
            children = parent.children()
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if skip(cmdline):
                continue
            helper = depth == 0 and any(h in cmdline for h in HELPERS) and (helpers is None or child.pid in helpers)
            if not helper:
                found.append(child)
            walk(child, depth + 1)

    walk(root, 0)
    return found


def end_leftovers(grace_s: float = 5.0, poll_s: float = 0.2, **kwargs) -> list[str]:
    """Kill this process's leftovers still alive after ``grace_s``; returns 'pid N: command line' for each."""
    deadline = time.monotonic() + grace_s
    while (left := leftovers(**kwargs)) and time.monotonic() < deadline:
        time.sleep(poll_s)
    lines = []
    for proc in left:
        try:
            lines.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(left, timeout=5)  # reaps those that are (or were adopted as) our children
    return lines
