"""Where a step's time goes: seconds per node and phase on this rank, gathered to rank 0.

The schedule and the graph optimizer time their work through a :class:`PhaseTimer`:

- ``forward`` / ``backward``: a node's own compute (its stages' forward; its autograd backward);
- ``communication``: waiting for and moving tensors between nodes (the bridge's receives and
  TP broadcasts; a receive that waits for a slower producer counts here) and the node's
  data-parallel gradient reduction;
- ``optimizer``: the node's parameter update.

On CUDA each measurement synchronises the device first, so kernels land in the phase that
launched them (a small cost; timing is off unless a timer is given).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
import torch.distributed as dist

PHASES = ("forward", "backward", "communication", "optimizer")


class PhaseTimer:
    """Accumulates seconds per (node, phase) on this rank until :meth:`take` hands them over."""

    def __init__(self, device: torch.device | None = None):
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
        self._seconds: dict[tuple[str, str], float] = defaultdict(float)

    @contextlib.contextmanager
    def measure(self, node: str, phase: str):
        """Add the time spent inside the ``with`` block to ``node``'s ``phase``."""
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._seconds[(node, phase)] += time.perf_counter() - start

    def take(self) -> dict[tuple[str, str], float]:
        """The seconds accumulated since the last call, and start again from zero."""
        seconds, self._seconds = dict(self._seconds), defaultdict(float)
        return seconds

    def _synchronize(self) -> None:
        if self._sync is not None:
            self._sync()


class NoTimer:
    """The timer used when nobody asked for timings: measures nothing."""

    def measure(self, node: str, phase: str):
        """A context that records nothing."""
        return contextlib.nullcontext()

    def take(self) -> dict[tuple[str, str], float]:
        """Always an empty dict."""
        return {}


def gather_to_first(obj, group) -> list | None:
    """Every rank's ``obj`` (picklable), on rank 0 of ``group``; None elsewhere. A collective:
    every rank of ``group`` calls it."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, gathered, group_dst=0, group=group)
    return gathered


def slowest_per_node(per_rank: list[dict[tuple[str, str], float]], order: list[str]) -> dict[str, dict[str, float]]:
    """Each node's seconds per phase, the largest over the ranks that timed it (the slowest rank
    sets the node's pace), nodes in ``order``."""
    nodes = {}
    for seconds in per_rank:
        for (node, phase), value in seconds.items():
            phases = nodes.setdefault(node, dict.fromkeys(PHASES, 0.0))
            phases[phase] = max(phases[phase], value)
    return {node: nodes[node] for node in order if node in nodes}
