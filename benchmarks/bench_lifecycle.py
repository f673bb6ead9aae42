"""Build -> step -> close cycles in one process: threads, open files and build time stay flat.

One rank builds the ``vlm`` graph, takes one training step and closes the model, 100 times;
then the same without ``close()`` (what every build did before models could be closed). The
ratio is the build time of the last 10 cycles over the first 10 (after one warm-up cycle) with
``close()``; target <= 1.2. Threads and open files are counted after each cycle.

Run: .venv/bin/python benchmarks/bench_lifecycle.py [--cycles N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402

WINDOW = 10


def _cycles(n: int, close: bool) -> list[tuple[int, int, float]]:
    import gc
    import time

    import psutil
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    me, rows = psutil.Process(), []
    for _ in range(n):
        start = time.perf_counter()
        (model,) = CompositeBuilder(vlm("single"), seed=1).build_distributed_models(
            ddp_config=DistributedDataParallelConfig())
        build = time.perf_counter() - start
        schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, total_steps=2)
        optimizer.zero_grad()
        optimizer.step(schedule.forward_backward(synthetic_batch(model.valid, 2, seed=1)))
        if close:
            model.close()
        del model, schedule, optimizer
        gc.collect()
        rows.append((me.num_threads(), me.num_fds(), build))
    return rows


def _summary(rows) -> dict:
    first, last = rows[1:1 + WINDOW], rows[-WINDOW:]
    return dict(threads=(rows[WINDOW][0], rows[-1][0]), files=(rows[WINDOW][1], rows[-1][1]),
                build=(statistics.median(r[2] for r in first), statistics.median(r[2] for r in last)))


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    closed = _summary(launch(_cycles, 1, args.cycles, True, timeout_s=1800)[0])
    kept = _summary(launch(_cycles, 1, args.cycles, False, timeout_s=1800)[0])
    rows = []
    for name, s in (("with close()", closed), ("without close()", kept)):
        rows.append((f"{name}: threads after cycle {WINDOW} -> {args.cycles}", "%d -> %d" % s["threads"]))
        rows.append((f"{name}: open files after cycle {WINDOW} -> {args.cycles}", "%d -> %d" % s["files"]))
        rows.append((f"{name}: build ms, first -> last {WINDOW} cycles",
                     "%.0f -> %.0f" % tuple(1e3 * b for b in s["build"])))
    ratio = closed["build"][1] / closed["build"][0]
    return report(f"lifecycle: {args.cycles} build-step-close cycles of vlm in one process", rows,
                  "last / first build time (closed)", ratio, "<= 1.2", args.json)


if __name__ == "__main__":
    main()
