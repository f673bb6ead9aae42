"""The GPU check kit, as far as it runs on CPU: ``scripts/gpu-check`` (help, --prepare, --out)
and ``benchmarks/bench_gpu.py --tiny``.

The ``network`` tests download from PyPI (``--prepare``) and take about a minute; the --out run
installs the prepared wheels and the working tree into a temporary target, runs the GPU tests
(all skipped here) and the tiny benchmark, exactly as on a GPU machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"
TINY = ["--tiny", "--steps", "2", "--warmup", "1"]


def _env(**extra) -> dict:
    """This environment without pytest's own variables (the runs below start their own pytest)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return {**env, "PYTHON": sys.executable, **extra}


def _run(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env), cwd=ROOT)


def _locked(name: str) -> str:
    pattern = re.compile(rf"^{name.replace('-', '[-_]')}==(.+)$", re.I | re.M)
    return pattern.search((ROOT / "requirements" / "lock.txt").read_text()).group(1).strip()


def _expected_wheels() -> dict[str, str]:
    names = ["megatron-core", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "psutil"]
    return {**{n.replace("-", "_"): _locked(n) for n in names}, "mamba_ssm": "2.3.2.post1"}


def _wheels(folder: pathlib.Path) -> dict[str, list[str]]:
    """Distribution name -> versions of the wheels in ``folder``."""
    out: dict[str, list[str]] = {}
    for path in folder.glob("*.whl"):
        name, version = path.name.split("-")[:2]
        out.setdefault(name.lower(), []).append(version)
    return out


def test_help_names_both_modes():
    result = _run("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    for text in ("--prepare", "--out DIR", "--wheels DIR", "report.md"):
        assert text in result.stdout
    bad = _run("--bogus", timeout=30)
    assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr


def _check_tiny_benchmark(stdout: str, json_path) -> None:
    lines = stdout.strip().splitlines()
    ratio = re.fullmatch(r"composite/monolithic = (\d+\.\d{3})", lines[-1])
    assert ratio, lines[-1]
    printed = json.loads(lines[-2])
    assert printed == json.loads(json_path.read_text())
    assert f"{printed['ratio']:.3f}" == ratio.group(1) and printed["ratio"] > 0
    metrics = printed["metrics"]
    assert all(v > 0 for v in metrics["tokens_per_s"].values()), metrics
    assert metrics["first_losses"]["composite"] == pytest.approx(metrics["first_losses"]["monolithic"], rel=1e-5)
    assert metrics["mfu"] == {"composite": None, "monolithic": None}  # no peak known for a CPU


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    (folder / "pydantic-1.0.0-py3-none-any.whl").write_text("stale")  # another version: removed
    first = _run("--prepare", "--wheels", str(folder), timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    return folder, first


@pytest.mark.network
def test_prepare_downloads_the_missing_wheels_once(wheels):
    folder, first = wheels
    assert "removing pydantic-1.0.0-py3-none-any.whl" in first.stdout
    assert _wheels(folder) == {k: [v] for k, v in _expected_wheels().items()}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 30 * 2**20
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = _run("--prepare", "--wheels", str(folder), timeout=120)
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stdout and "building" not in again.stdout, again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.network
def test_out_installs_and_reports_on_cpu(wheels, tmp_path):
    folder, _ = wheels
    out = tmp_path / "out"
    result = _run("--out", str(out), "--wheels", str(folder), timeout=900, MIMO_SITE=str(tmp_path / "site"),
                  GPU_CHECK_BENCH_ARGS=" ".join(TINY), GPU_CHECK_JOBS="0")  # one process: 2 cores here
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["report.md", "env.txt", "install.log", "pytest.log", "junit.xml", "bench.log",
                            "bench.json"]), files
    report = (out / "report.md").read_text()
    assert "| install (install.log) | ok |" in report and "| benchmark (bench.log, bench.json) | ok |" in report
    assert re.search(r"`pytest -m gpu tests/gpu`: \d+ skipped", report), report
    _check_tiny_benchmark((out / "bench.log").read_text(), out / "bench.json")  # the benchmark runs on CPU
    builders = (out / "env.txt").read_text().split("--- builders")[1]
    for name in ("mamba", "vision", "audio", "projector", "gpt"):  # from the target, loaded from the tree
        assert re.search(rf"^{name} submodels\.\w+:\w+ {ROOT}/submodels/\w+\.py$", builders, re.M), builders
    site = tmp_path / "site"
    assert (site / "megatron" / "core").is_dir() and (site / "mamba_ssm" / "ops" / "triton").is_dir()
    (entry_points,) = site.glob("mimo_builder-*.dist-info/entry_points.txt")
    assert "[mimo_builder.builders]" in entry_points.read_text()
