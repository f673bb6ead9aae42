"""Run every ratio benchmark and print the README's summary table (markdown).

Run: .venv/bin/python benchmarks/run_all.py [--only NAME ...]
Each benchmark measures its baseline in the same run and reports a ratio; none asserts timing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

BENCHMARKS = ["bench_build", "bench_walker", "bench_groups", "bench_plan", "bench_ssd", "bench_ssd_short", "bench_hybrid",
              "bench_bridge", "bench_composite", "bench_optimizer", "bench_pipeline", "bench_checkpoint",
              "bench_lifecycle", "bench_cli", "bench_lora", "bench_generate", "bench_packing",
              "bench_encoder_batching", "bench_control_plane"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=BENCHMARKS, choices=BENCHMARKS)
    args = parser.parse_args(argv)
    results = [(name, importlib.import_module(name).main([])) for name in args.only]
    print("\n| benchmark | ratio | value | target |\n|---|---|---|---|")
    for name, r in results:
        print(f"| `{name}`: {r['benchmark']} | {r['ratio_name']} | {r['ratio']:.3f} | {r['target']} |")


if __name__ == "__main__":
    main()
