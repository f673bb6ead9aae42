"""Bridge send_tensor/recv_tensor throughput vs raw torch.distributed send/recv of the same bytes.

Two gloo ranks; rank 0 sends fp32 tensors of 64 KiB, 1 MiB and 16 MiB, rank 1 receives. Per
size and per method, one round is: a barrier, then N one-way transfers timed on the receiver
(the receiver's elapsed time is the measurement). Methods, alternated round by round with the
order reversed every round:
  raw         dist.send(t, 1) / dist.recv(buf, 0) into a preallocated buffer, default group
  raw_group   the same on ``dist.new_group(backend="gloo")``, the kind of group the runtime uses
  raw_alloc   raw on the group into a fresh torch.empty per transfer (as recv_tensor allocates):
              separates the cost of allocating from the cost of the header message
  bridge      send_tensor(t, 1, group) / recv_tensor(0, cpu, group): an int64 header message,
              then the data into a freshly allocated tensor
  mailbox     what the pipelined runtime does once a slot's shape is known: Mailbox.send (isend,
              no header; waited at the end of the round) / Mailbox.take into a fresh tensor
The headline is mailbox / raw_group throughput at the smallest size, where a header message
costs most (target >= 0.9); bridge / raw_group is reported per size too.

Run: .venv/bin/python benchmarks/bench_bridge.py [--json out.json] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402

# (label, bytes, transfers per timed round): 16-128 MiB moved per round.
SIZES = [("64 KiB", 64 << 10, 256), ("1 MiB", 1 << 20, 48), ("16 MiB", 16 << 20, 8)]
METHODS = ("raw", "raw_group", "raw_alloc", "bridge", "mailbox")


def _measure(repeats):
    import torch
    import torch.distributed as dist

    from mimo_builder._internal.runtime.bridge import Mailbox, recv_tensor, send_tensor
    from mimo_builder._internal.runtime.posting import Message

    rank, cpu = dist.get_rank(), torch.device("cpu")
    group = dist.new_group(backend="gloo")

    def mailbox_round(t, n):
        keys = [("act", 0, i, 0) for i in range(n)]
        headers = {"sent": {(0, 0)}, "received": {(0, 0): (t.shape, t.dtype)}}  # steady state
        box = Mailbox(group, rank, [Message(key, 1 - rank, rank == 0) for key in keys], headers, cpu,
                      gradient_like=None)
        for i, key in enumerate(keys):  # one message per operation, as a pipelined step posts them
            if rank == 0:
                box.send(key, t, 1)
            box.post(i + 1, wait=True)
            if rank == 1:
                box.take(key, 0)
        box.close()

    def round_(method, t, buf, n):
        dist.barrier()
        start = time.perf_counter()
        if method == "mailbox":
            mailbox_round(t, n)
            return time.perf_counter() - start
        for _ in range(n):
            if method == "bridge":
                send_tensor(t, 1, group) if rank == 0 else recv_tensor(0, cpu, group)
            else:
                g = None if method == "raw" else group
                if rank == 0:
                    dist.send(t, 1, group=g)
                else:
                    dist.recv(torch.empty_like(t) if method == "raw_alloc" else buf, 0, group=g)
        return time.perf_counter() - start

    results = {}
    for label, nbytes, n in SIZES:
        t = torch.randn(nbytes // 4)
        buf = torch.empty_like(t)
        for method in METHODS:  # warm-up: connections, allocator
            round_(method, t, buf, n)
        if rank == 1:  # correctness of what the bridge delivers
            got = recv_tensor(0, cpu, group)
        else:
            send_tensor(t, 1, group)
        samples = {m: [] for m in METHODS}
        for i in range(repeats):
            for method in METHODS if i % 2 == 0 else reversed(METHODS):
                samples[method].append(round_(method, t, buf, n))
        if rank == 1:
            assert got.dtype == t.dtype and got.shape == t.shape
            results[label] = {m: n * nbytes / statistics.median(s) / 1e6 for m, s in samples.items()}
    if rank == 1:  # the sender's data, for the correctness check above
        dist.recv(buf, 0)
        assert got.equal(buf), "bridge delivered different data"
    else:
        dist.send(t, 1)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per size and method")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mimo_builder._internal.platform.launch import launch

    mbs = launch(_measure, 2, args.repeats, timeout_s=900)[1]
    rows = []
    for label, _, n in SIZES:
        m = mbs[label]
        rows.append((f"{label} x {n}: raw / on group / fresh buffer / bridge / mailbox",
                     f"{m['raw']:.0f} / {m['raw_group']:.0f} / {m['raw_alloc']:.0f} / {m['bridge']:.0f} / "
                     f"{m['mailbox']:.0f} MB/s"))
        rows.append((f"{label}: mailbox, bridge / on group",
                     f"{m['mailbox'] / m['raw_group']:.3f}, {m['bridge'] / m['raw_group']:.3f}"))
    small = SIZES[0][0]
    rows.append(("repeats (median of rounds)", str(args.repeats)))
    ratio = mbs[small]["mailbox"] / mbs[small]["raw_group"]
    return report("runtime Mailbox and bridge send/recv vs raw dist.send/recv (2 gloo ranks, CPU, fp32)",
                  rows, f"ratio mailbox / raw throughput at {small}", ratio, ">= 0.9", args.json)


if __name__ == "__main__":
    main()
