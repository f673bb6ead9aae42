"""Write report.md for ``scripts/gpu-check --out DIR`` from the logs it left in DIR.

Run: python3 scripts/gpu_check_report.py DIR INSTALL_RC TESTS_RC BENCH_RC [CLI_RC]  (markdown on stdout)
(CLI_RC: the status of scripts/gpu_cli_checks.py, the user's commands; their tables come from cli.json.)
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
    for dist in ("triton", "megatron-core", "mamba-ssm", "causal-conv1d", "pydantic"):
        try:
            rows.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((dist, "not installed"))
    return rows


def _last_line(log: pathlib.Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1].replace("|", "/") if lines else "(no log)"


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


def _figures(run: dict) -> str:
    f, parts = run.get("figures") or {}, []
    if done := f.get("done"):
        parts.append(f"loss {done['first_loss']:.4f} -> {done['last_loss']:.4f}; done: {done['steps']} steps "
                     f"on {done['ranks']} ranks in {done['seconds']:.1f} s")
    if acc := f.get("accuracy"):
        parts.append(f"held-out accuracy {acc['before']:.1f}% -> {acc['after']:.1f}%")
    first, last = f.get("first_step_line"), f.get("last_step_line")
    if first and last:
        parts.append(f"step {first['step']} {first['ms']} ms, step {last['step']} {last['ms']} ms")
    if f.get("compile_notice"):
        parts.append("compile notice printed")
    return "; ".join(parts) or "-"


def _checks(run: dict) -> str:
    if not run.get("checks"):
        return "-"
    failed = [text for text, ok in run["checks"] if ok is False]
    skipped = [text for text, ok in run["checks"] if ok is None]
    shown = f"FAILED: {', '.join(failed)}" if failed else "ok"
    return shown + (f" (n/a off CUDA: {', '.join(skipped)})" if skipped else "")


def _ms(value, status, limit) -> str:
    if value is not None:
        return f"{value:,} ms"
    if status in ("TIMED OUT", "KILLED (timeout)"):
        return f"> {limit} s (timed out)"
    return status or "not run"


def cli_tables(data: dict) -> list[str]:
    """The user's commands (cli.json of scripts/gpu_cli_checks.py) as markdown lines."""
    env, budget = data.get("environment", {}), data.get("budget_s")
    lines = [f"Device: {data.get('device')}{'; quick mode (small step counts)' if data.get('quick') else ''}; "
             f"{data.get('elapsed_s')} s of a {'unlimited' if budget is None else budget} s budget. Commands 1-4 "
             "ran with " + ", ".join(f"{k}={v}" for k, v in env.items()) + ". Logs: cli/NAME.log.", "",
             "| command | exit | wall s | figures | checks |", "|---|---|---|---|---|"]
    for run in data.get("runs", []):
        rc = run["status"] if run.get("rc") is None else (str(run["rc"]) if run["rc"] == 0 else run["status"])
        wall = "-" if run.get("wall_s") is None else f"{run['wall_s']:.1f}"
        phase = f" ({run['phase']})" if run.get("phase") else ""
        lines.append(f"| `{run['command']}`{phase} | {rc} | {wall} | {_figures(run)} | {_checks(run)} |")
    if data.get("first_step"):
        lines += ["", "First step, cold and warm (`mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps N "
                  "--log-interval 1`; cold: a fresh empty TRITON_CACHE_DIR, warm: the same command again on it; "
                  "later step: the warm run's last step):", "",
                  "| mode | cold: first step | warm: first step | later step | cold run wall s | warm run wall s |",
                  "|---|---|---|---|---|---|"]
        for row in data["first_step"]:
            walls = ["-" if w is None else f"{w:.1f}" for w in (row["cold_wall_s"], row["warm_wall_s"])]
            lines.append(f"| {row['label']} | {_ms(row['cold_first_ms'], row['cold_status'], row['cold_limit_s'])} "
                         f"| {_ms(row['warm_first_ms'], row['warm_status'], None)} "
                         f"| {_ms(row['later_ms'], row['warm_status'], None)} | {walls[0]} | {walls[1]} |")
    return lines


def _cli_section(path: pathlib.Path) -> list[str]:
    if not path.exists():
        return ["(no cli.json: see cli.log)"]
    return cli_tables(json.loads(path.read_text()))


def main(argv: list[str]) -> None:
    out, (install_rc, tests_rc, bench_rc) = pathlib.Path(argv[0]), map(int, argv[1:4])
    cli_rc = int(argv[4]) if len(argv) > 4 else None
    print(f"# GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
    print("| | |\n|---|---|")
    for key, value in _versions():
        print(f"| {key} | {value} |")
    print(f"\n## Parts\n\n| part | status |\n|---|---|\n| install (install.log) | {_status(install_rc)} |")
    print(f"| tests (pytest.log, junit.xml) | {_status(tests_rc)} |")
    print(f"| causal-conv1d (causal_conv1d.log) | {_last_line(out / 'causal_conv1d.log')} |")
    if cli_rc is not None:
        print(f"| user commands (cli.log, cli.json, cli/) | {_status(cli_rc)} |")
    print(f"| benchmark (bench.log, bench.json) | {_status(bench_rc)} |")
    print(f"\n## Tests\n\n`pytest -m gpu tests/gpu`: {_pytest_summary(out / 'pytest.log')}")
    if cli_rc is not None:
        print("\n## User commands\n")
        print("\n".join(_cli_section(out / "cli.json")))
    print("\n## Benchmark\n")
    print("\n".join(_bench_table(out / "bench.json")))


if __name__ == "__main__":
    main(sys.argv[1:])
