"""How fast the command line answers: ``mimo-builder --help`` against ``import megatron.core``.

Both are fresh interpreters, measured in alternation (``interleaved_medians``): the command line
must answer ``--help`` (and argument errors) without importing torch or Megatron-Core, so its
time is Python's start-up and argparse, while any command that builds pays MCore's import.

Run: .venv/bin/python benchmarks/bench_cli.py [--json out.json] [--repeats N]
Reports medians and the ratio --help / import megatron.core (target <= 0.1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import interleaved_medians, report  # noqa: E402

PYTHON = sys.executable
CLI = os.path.join(os.path.dirname(PYTHON), "mimo-builder")


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    times = interleaved_medians({
        "help": lambda: _run([CLI, "--help"]),
        "megatron": lambda: _run([PYTHON, "-W", "ignore", "-c", "import megatron.core"]),
        "python": lambda: _run([PYTHON, "-c", "pass"]),
    }, repeats=args.repeats)
    rows = [("mimo-builder --help", f"{times['help'] * 1e3:.0f} ms"),
            ("python -c 'import megatron.core'", f"{times['megatron'] * 1e3:.0f} ms"),
            ("python -c 'pass' (start-up alone)", f"{times['python'] * 1e3:.0f} ms")]
    result = report("Command line start-up", rows, "--help / import megatron.core",
                    times["help"] / times["megatron"], "<= 0.1", args.json)
    print(f"--help / import megatron.core = {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
