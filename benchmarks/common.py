"""Shared helpers for the ratio benchmarks: timing, single-rank setup, result reporting."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Median times of several functions measured in alternation, the order reversed every
    round, so drift and order effects hit all of them alike."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def report(title: str, rows: list[tuple[str, str]], ratio_name: str, ratio: float, target: str,
           json_path: str | None = None) -> dict:
    """Print a small table and the ratio; optionally write them as JSON."""
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows + [(ratio_name, "")])
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  {ratio_name:<{width}}  {ratio:.3f}   (target {target})")
    result = {"benchmark": title, "ratio_name": ratio_name, "ratio": ratio, "target": target,
              "rows": dict(rows)}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
