"""Write report.md for ``scripts/gpu-check --out DIR`` from the logs it left in DIR.

Run: python3 scripts/gpu_check_report.py DIR INSTALL_RC TESTS_RC BENCH_RC  (markdown on stdout)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import re
import sys

SUMMARY = re.compile(r"\b(passed|failed|skipped|error|errors|no tests ran)\b")


def _status(rc: int) -> str:
    return {0: "ok", 124: "TIMED OUT", 137: "KILLED (timeout)"}.get(rc, f"FAILED (exit {rc})")


def _versions() -> list[tuple[str, str]]:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
    rows = [("GPU", gpu), ("torch", torch.__version__)]
    for dist in ("triton", "megatron-core", "mamba-ssm", "pydantic"):
        try:
            rows.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((dist, "not installed"))
    return rows


def _pytest_summary(log: pathlib.Path) -> str:
    if not log.exists():
        return "(no pytest.log)"
    lines = [ln.strip("= ") for ln in log.read_text(errors="replace").splitlines() if SUMMARY.search(ln)]
    return lines[-1] if lines else "(no summary line: see pytest.log)"


def _bench_table(path: pathlib.Path) -> list[str]:
    if not path.exists():
        return ["(no bench.json: see bench.log)"]
    result = json.loads(path.read_text())
    rows = [f"| {k} | {v} |" for k, v in result.get("rows", {}).items()]
    rows.append(f"| **{result.get('ratio_name', 'ratio')}** | **{result.get('ratio', float('nan')):.3f}** |")
    return [f"{result.get('benchmark', '')}", "", "| quantity | value |", "|---|---|", *rows]


def main(argv: list[str]) -> None:
    out, (install_rc, tests_rc, bench_rc) = pathlib.Path(argv[0]), map(int, argv[1:4])
    print(f"# GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
    print("| | |\n|---|---|")
    for key, value in _versions():
        print(f"| {key} | {value} |")
    print(f"\n## Parts\n\n| part | status |\n|---|---|\n| install (install.log) | {_status(install_rc)} |")
    print(f"| tests (pytest.log, junit.xml) | {_status(tests_rc)} |\n| benchmark (bench.log, bench.json) "
          f"| {_status(bench_rc)} |")
    print(f"\n## Tests\n\n`pytest -m gpu tests/gpu`: {_pytest_summary(out / 'pytest.log')}")
    print("\n## Benchmark\n")
    print("\n".join(_bench_table(out / "bench.json")))


if __name__ == "__main__":
    main(sys.argv[1:])
