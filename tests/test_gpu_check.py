"""The GPU check kit, as far as it runs on CPU: ``scripts/gpu-check`` (help, --prepare, --out),
``benchmarks/bench_gpu.py --tiny`` and ``scripts/gpu_cli_checks.py --quick`` (the user's commands).

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
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"
CLI_CHECKS = ROOT / "scripts" / "gpu_cli_checks.py"
TINY = ["--tiny", "--steps", "2", "--warmup", "1"]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_report  # noqa: E402
import gpu_cli_checks  # noqa: E402


def _env(**extra) -> dict:
    """This environment without pytest's own variables (the runs below start their own pytest) and
    without what importing mimo_builder set in this process (TRITON_CACHE_AUTOTUNING): as from a shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "TRITON_CACHE_AUTOTUNING"}
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
    assert lines[-2] == "composite MFU = n/a (no peak for this device)"  # no peak known for a CPU
    printed = json.loads(lines[-3])
    assert printed == json.loads(json_path.read_text())
    assert f"{printed['ratio']:.3f}" == ratio.group(1) and printed["ratio"] > 0
    metrics = printed["metrics"]
    assert all(v > 0 for v in metrics["tokens_per_s"].values()), metrics
    assert metrics["first_losses"]["composite"] == pytest.approx(metrics["first_losses"]["monolithic"], rel=1e-5)
    assert metrics["mfu"] == {"composite": None, "monolithic": None}
    assert len(metrics["round_ratios"]) == 3 and metrics["ratio_spread"] >= 0
    assert printed["ratio"] == pytest.approx(sorted(metrics["round_ratios"])[1])  # the median round
    classes = metrics["kernel_classes"]
    assert set(classes) == {"composite", "monolithic"} and classes["composite"]["GEMM"] > 0
    assert list(classes["composite"])[-2:] == ["other element-wise", "idle"]
    assert metrics["memory_estimate_bytes"] > sum(metrics["params"].values()) * 2  # bf16 parameters and more
    assert metrics["peak_memory_bytes"] is None and metrics["memory_error"] is None  # no CUDA here


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
    # causal-conv1d's source and what building it needs, apart from what the checks install
    assert _wheels(folder / "build") == {**{n: [_locked(n)] for n in ("setuptools", "wheel", "packaging")},
                                         "ninja": ["1.13.2"]}
    assert (folder / "build" / "causal_conv1d-1.7.0.tar.gz").is_file()
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 30 * 2**20
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}
    again = _run("--prepare", "--wheels", str(folder), timeout=120)
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stdout and "building" not in again.stdout, again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


@pytest.mark.network
def test_out_installs_and_reports_on_cpu(wheels, tmp_path):
    folder, _ = wheels
    out = tmp_path / "out"
    result = _run("--out", str(out), "--wheels", str(folder), timeout=900, MIMO_SITE=str(tmp_path / "site"),
                  GPU_CHECK_BENCH_ARGS=" ".join(TINY), GPU_CHECK_JOBS="0",  # one process: 2 cores here
                  GPU_CHECK_CLI_ARGS="--quick --only mamba_lm")
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["report.md", "env.txt", "install.log", "pytest.log", "junit.xml", "cli.log", "cli.json",
                            "cli", "bench.log", "bench.json", "causal_conv1d.log"]), files
    report = (out / "report.md").read_text()
    # no GPU here: the build says why it cannot start and the kit goes on without it
    assert "| causal-conv1d (causal_conv1d.log) | causal-conv1d: not built (exit 2) |" in report, report
    assert re.search(r"no CUDA toolkit \(nvcc and the runtime headers\) found|no CUDA device to build for", (out / "causal_conv1d.log").read_text())
    assert "| install (install.log) | ok |" in report and "| benchmark (bench.log, bench.json) | ok |" in report
    assert "| user commands (cli.log, cli.json, cli/) | ok |" in report, report
    assert "| `mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps 2` | 0 |" in report, report
    # the kit's mode: one config per kernel, which mimo_builder's TRITON_CACHE_AUTOTUNING=1 would undo
    assert "MAMBA_DETERMINISTIC=1, TRITON_CACHE_AUTOTUNING=0" in report, report
    assert re.search(r"`pytest -m gpu tests/gpu`: \d+ skipped", report), report
    _check_tiny_benchmark((out / "bench.log").read_text(), out / "bench.json")  # the benchmark runs on CPU
    builders = (out / "env.txt").read_text().split("--- builders")[1]
    for name in ("mamba", "vision", "audio", "projector", "gpt"):  # from the target, loaded from the tree
        assert re.search(rf"^{name} submodels\.\w+:\w+ {ROOT}/submodels/\w+\.py$", builders, re.M), builders
    site = tmp_path / "site"
    assert (site / "megatron" / "core").is_dir() and (site / "mamba_ssm" / "ops" / "triton").is_dir()
    (entry_points,) = site.glob("mimo_builder-*.dist-info/entry_points.txt")
    assert "[mimo_builder.builders]" in entry_points.read_text()


def _cli_checks(out, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI_CHECKS), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=ROOT)


def test_cli_checks_quick_on_cpu(tmp_path, capsys):
    """The driver runs command 1 (2 steps on CPU), logs it, parses it, and the report shows it."""
    start = time.monotonic()
    result = _cli_checks(tmp_path, "--quick", "--only", "mamba_lm", "--budget", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "cli.json").read_text())
    assert data["quick"] and not data["cuda"] and data["first_step"] == []
    (run,) = data["runs"]
    assert run["name"] == "mamba_lm" and run["rc"] == 0 and run["ok"] and run["log"] == "cli/mamba_lm.log"
    assert run["command"] == "mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps 2"
    done = run["figures"]["done"]
    assert done["steps"] == 2 and done["ranks"] == 1 and done["last_loss"] < done["first_loss"]
    assert run["figures"]["first_step_line"]["step"] == 1 and run["figures"]["last_step_line"]["step"] == 2
    assert run["figures"]["first_step_line"]["loss"] == pytest.approx(done["first_loss"], abs=1e-4)
    assert ["'compiling GPU kernels for the first step' printed", None] in run["checks"]  # CUDA only
    log = (tmp_path / "cli" / "mamba_lm.log").read_text()
    assert log.startswith("# mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps 2\n") and "# exit 0 after" in log
    row = "| `mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps 2` | 0 |"
    assert row in result.stdout, result.stdout
    gpu_check_report.main([str(tmp_path), "0", "0", "0", "0"])
    report = capsys.readouterr().out
    assert "| user commands (cli.log, cli.json, cli/) | ok |" in report and row in report, report
    assert f"loss {done['first_loss']:.4f} -> {done['last_loss']:.4f}; done: 2 steps on 1 ranks" in report
    assert time.monotonic() - start < 60


def test_cli_checks_budget_spent(tmp_path):
    """Commands that no longer fit the kit's time are listed as not run, and the driver fails."""
    result = _cli_checks(tmp_path, "--only", "avlm,first_step", "--budget", "0", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads((tmp_path / "cli.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["avlm", "first_step_one_config_cold", "first_step_one_config_warm",
                                                 "first_step_autotune_cold", "first_step_autotune_warm"]
    statuses = {r["name"]: r["status"] for r in data["runs"] if r["rc"] is None}
    assert all(statuses[name].startswith("not run (kit budget spent: 0 s left") for name in
               ("avlm", "first_step_one_config_cold", "first_step_autotune_cold")), statuses
    for mode in ("one_config", "autotune"):  # a warm run needs its cold run
        assert statuses[f"first_step_{mode}_warm"] == f"not run (first_step_{mode}_cold did not pass)", statuses
    assert len(statuses) == 5 and data["first_step"][1]["cold_first_ms"] is None
    assert not list((tmp_path / "cli").iterdir())
    assert "| `mimo-builder run graphs/avlm.yaml --colocate --nproc 1 --steps 20` | not run (kit budget spent" \
        in result.stdout, result.stdout


CUDA_LOG = """\
process groups to create: 16 (every rank takes part in each)
compiling GPU kernels for the first step; later runs reuse the cache (/tmp/gpu-check-triton-x/one_config)
step 1/3 | loss  5.5613 | grad norm   2.537 |       17 tokens/s |  41234 ms
    ms per step fwd/bwd/comm/opt: lm 30000/11000/1/13
step 2/3 | loss  5.2745 | grad norm   2.633 |    86370 tokens/s |     12 ms
step 3/3 | loss  5.0101 | grad norm   2.433 |    86370 tokens/s |      9 ms
held-out after training: lm.loss 0.1883 | lm.correct 90.2% (256 samples)
accuracy: before 0.0%, after 90.2%
done: 3 steps on 1 ranks in 50.1 s; loss 5.5613 -> 5.0101
"""


def test_cli_parse_and_first_step_table():
    """What a CUDA run prints (the lines of monitor.py, train.py, cli.py) and the mode table the report shows."""
    figures = gpu_cli_checks.parse(CUDA_LOG)
    assert figures["compile_notice"] and figures["step_lines"] == 3
    assert figures["first_step_line"] == {"step": 1, "of": 3, "loss": 5.5613, "ms": 41234}
    assert figures["last_step_line"]["ms"] == 9
    assert figures["done"] == {"steps": 3, "ranks": 1, "seconds": 50.1, "first_loss": 5.5613, "last_loss": 5.0101}
    assert figures["accuracy"] == {"before": 0.0, "after": 90.2}
    commands = {c.name: c for c in gpu_cli_checks.commands(quick=False)}
    assert commands["digits"].steps == 400 and commands["torchrun"].argv[:2] == ["-m", "torch.distributed.run"]
    cold = commands["first_step_one_config_cold"]
    assert all(ok for _, ok in gpu_cli_checks.checks(cold, 0, figures, cuda=True))
    assert not dict(gpu_cli_checks.checks(cold, 0, gpu_cli_checks.parse(CUDA_LOG.replace("compiling", "x")),
                                          cuda=True))["'compiling GPU kernels for the first step' printed"]

    def run(mode, phase, rc, first=None, last=None, wall=None, limit=60):
        figures = {} if first is None else {"first_step_line": {"step": 1, "ms": first},
                                            "last_step_line": {"step": 3, "ms": last}}
        return {"mode": mode, "phase": phase, "rc": rc, "status": gpu_cli_checks._status(rc) if rc is not None
                else "not run (first_step_autotune_cold did not pass)", "figures": figures, "wall_s": wall,
                "limit_s": limit}

    rows = gpu_cli_checks.first_step_table([
        run("one_config", "cold", 0, 41234, 10, 60.2), run("one_config", "warm", 0, 812, 9, 15.0),
        run("autotune", "cold", 124, wall=200.0, limit=190), run("autotune", "warm", None)])
    lines = gpu_check_report.cli_tables({"device": "NVIDIA H200", "budget_s": 300, "elapsed_s": 290.0,
                                         "environment": {}, "runs": [], "first_step": rows})
    table = "\n".join(lines)
    assert ("| one config per kernel (MAMBA_DETERMINISTIC=1 TRITON_CACHE_AUTOTUNING=0) | 41,234 ms | 812 ms | 9 ms "
            "| 60.2 | 15.0 |") in table, table
    assert ("| default: autotune, cached (TRITON_CACHE_AUTOTUNING=1, MAMBA_DETERMINISTIC unset) | > 190 s (timed out) "
            "| not run (first_step_autotune_cold did not pass) | not run (first_step_autotune_cold did not pass) "
            "| 200.0 | - |") in table, table
