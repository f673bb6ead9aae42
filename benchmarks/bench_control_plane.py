"""The control plane's load on the job's TCPStore: its capacity, each rank's traffic, the largest world.

Every rank's :class:`~mimo_builder._internal.runtime.guard.StepGuard` talks to the one TCPStore
that the launcher (or the first torchrun agent) hosts. This measures, on this machine:

1. the store's capacity: a real TCPStore on 127.0.0.1 and ``--clients`` client processes that
   make the watchdog's request mix (set a beat, read the failure key with compare_set; every
   eighth round also check and get a peer's beat, as a stall report does) as fast as they can
   for ``--seconds``. The clients share the machine's cores with the store, so on a small
   machine this is a floor of what a dedicated store host sustains;
2. one rank's traffic in a real run: the ``vlm`` graph on 2 gloo ranks (colocated_dp2), its
   guard's store client wrapped in a counter (:mod:`store_counting`), ``--steps`` steps at 1 and
   at 4 microbatches: the requests the main thread makes per step (schedule and optimizer) and
   those the watchdog makes per poll;
3. the largest world whose steady-state rate stays within ``--fraction`` (default 50%) of the
   capacity at one step per second: ``world x (per-step requests + requests per poll / poll
   interval at that world)``; the interval grows with the world (:func:`poll_interval_s`).

The last line is ``largest world at 1 s steps = N`` (target N >= 16384).

Run: .venv/bin/python benchmarks/bench_control_plane.py [--clients N] [--seconds S] [--steps N]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402
from store_counting import count_steps  # noqa: E402

LARGEST = 1 << 24
"""No world beyond this is searched."""


# --- 1. the store's capacity --------------------------------------------------------------------

def _client(port: int, index: int, go, deadline_s: float, out) -> None:
    """One simulated rank: the watchdog's requests, back to back, until ``deadline_s`` after ``go``."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    beat, peer, failure = f"bench/beat/{index}", f"bench/beat/{index ^ 1}", "bench/failure/1"
    store.set(beat, "0|1|0|host:1:3|warm-up")
    counts = {"set": 0, "compare_set": 0, "check": 0, "get": 0}
    go.wait(60)
    end = time.monotonic() + deadline_s
    tick = 0
    while time.monotonic() < end:
        tick += 1
        store.set(beat, f"{tick}|1|0|host:1:3|node 'lm' forward (microbatch 0)")
        store.compare_set(failure, "\x01", "\x01")  # the failure key's value, or the sentinel
        counts["set"] += 1
        counts["compare_set"] += 1
        if tick % 8 == 0 and store.check([peer]):
            store.get(peer)
            counts["check"] += 1
            counts["get"] += 1
    out.put(counts)


def store_capacity(clients: int, seconds: float) -> tuple[float, dict[str, int]]:
    """Requests per second a real TCPStore on 127.0.0.1 served to ``clients`` processes making
    the watchdog's request mix for ``seconds``, and the requests by kind. Each client ends itself
    at its deadline; the processes are joined (and ended if stuck) before returning."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(server.port, i, go, seconds, out), daemon=True)
             for i in range(clients)]
    for p in procs:
        p.start()
    _wait_for_keys(server, [f"bench/beat/{i}" for i in range(clients)], timeout_s=120)
    start = time.monotonic()
    go.set()
    totals = {}
    try:
        for _ in procs:
            for kind, n in out.get(timeout=seconds + 60).items():
                totals[kind] = totals.get(kind, 0) + n
    finally:
        elapsed = time.monotonic() - start
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return sum(totals.values()) / max(elapsed, seconds), totals


def _wait_for_keys(store, keys: list[str], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not store.check(keys):
        if time.monotonic() > end:
            raise TimeoutError(f"store clients did not connect within {timeout_s:.0f} s")
        time.sleep(0.05)


# --- 3. the largest world -------------------------------------------------------------------------

def steady_rate(world: int, per_step: float, per_poll: float, steps_per_s: float = 1.0) -> float:
    """The whole job's requests per second at ``world`` ranks: each rank's per-step requests at
    ``steps_per_s`` plus its watchdog's ``per_poll`` requests every poll interval at that world."""
    from mimo_builder._internal.runtime.guard import poll_interval_s

    return world * (per_step * steps_per_s + per_poll / poll_interval_s(world))


def largest_world(capacity: float, per_step: float, per_poll: float) -> int:
    """The largest world whose :func:`steady_rate` at 1 step/s stays within ``capacity`` (the rate
    never falls as the world grows, so a bisection finds it)."""
    if steady_rate(1, per_step, per_poll) > capacity:
        return 0
    low, high = 1, LARGEST
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if steady_rate(mid, per_step, per_poll) <= capacity else (low, mid - 1)
    return low


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="simulated ranks in the load test")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the load test")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per microbatch count in the real run")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the capacity the job may use")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.seconds <= 0 or args.steps < 1 or not 0 < args.fraction <= 1:
        parser.error("--clients >= 2, --seconds > 0, --steps >= 1 and 0 < --fraction <= 1")

    from mimo_builder._internal.runtime.guard import poll_interval_s

    capacity, kinds = store_capacity(args.clients, args.seconds)
    counts = count_steps("colocated_dp2", (1, 4), args.steps)
    per_step = max(c["main_per_step"] for c in counts.values())
    per_poll = max(c["watchdog_per_poll"] for c in counts.values())
    world = largest_world(args.fraction * capacity, per_step, per_poll)
    rows = [("store capacity (mix, %d clients, %.0f s)" % (args.clients, args.seconds), f"{capacity:,.0f} requests/s"),
            ("  requests by kind", ", ".join(f"{k} {n:,}" for k, n in kinds.items()))]
    for m, c in counts.items():
        rows.append((f"one rank, M={m}: main thread", f"{c['main_per_step']:.2f} requests/step ({c['main_kinds']})"))
        rows.append((f"one rank, M={m}: watchdog", f"{c['watchdog_per_s']:.2f} requests/s = {c['watchdog_per_poll']:.2f} "
                                                   f"per poll of {c['interval_s']:.2f} s ({c['watchdog_kinds']})"))
    for w in (2, 1024, 16384, world):
        rows.append((f"world {w}: poll interval, job's rate", f"{poll_interval_s(w):.2f} s, "
                                                              f"{steady_rate(w, per_step, per_poll):,.0f} requests/s"))
    rows.append(("capacity allowed", f"{args.fraction:.0%} = {args.fraction * capacity:,.0f} requests/s"))
    result = report("Control plane: the job's TCPStore under the step guard's traffic", rows,
                    "largest world / 16384", world / 16384, ">= 1", args.json)
    print(f"largest world at 1 s steps = {world}")
    return result


if __name__ == "__main__":
    main()
