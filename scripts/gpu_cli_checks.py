"""The user's commands on the GPU machine: the CLI part of ``scripts/gpu-check`` (docs/gpu.md).

Runs, each bounded by ``timeout`` and logged to DIR/cli/NAME.log, from the repository root:

  1 mamba_lm    mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps 20
  2 avlm        mimo-builder run graphs/avlm.yaml --colocate --nproc 1 --steps 20
  3 digits      mimo-builder --allow examples run examples/digits_sum.yaml --colocate --nproc 1
                --steps 400 --batch-size 64 --log-interval 50 --data examples.digits_sum:train_data
                --eval-data examples.digits_sum:held_out_data
  4 torchrun    torchrun --nproc-per-node 1 -m mimo_builder.cli run graphs/mamba_lm.yaml --steps 5
  5 first_step  command 1 with --steps 3 --log-interval 1, twice (cold, then warm) on a fresh empty
                TRITON_CACHE_DIR, in two modes: one config per kernel (MAMBA_DETERMINISTIC=1
                TRITON_CACHE_AUTOTUNING=0), then the default (autotune, cached:
                TRITON_CACHE_AUTOTUNING=1, MAMBA_DETERMINISTIC unset)

Commands 1-4 run in the environment this script is given (the kit's: MAMBA_DETERMINISTIC=1 and
TRITON_CACHE_AUTOTUNING=0 unless set, Triton's default cache, which the GPU tests filled).
``mimo-builder`` runs as ``PYTHON -m mimo_builder.cli`` and torchrun as ``PYTHON -m
torch.distributed.run`` (this interpreter; the console scripts may not be on PATH).

Writes DIR/cli.json (read by gpu_check_report.py) and prints the same tables. Exit status: 0 when
every selected command ran and passed its checks, else 1.

  python scripts/gpu_cli_checks.py --out DIR [--budget S] [--quick] [--only NAME[,NAME]]

--budget S: seconds for all of them (the kit passes what is left of its 8 minutes); a command
gets at most its own limit and what is left, and one that no longer fits is listed as not run.
--quick: small step counts, for a dry run on CPU (the checks then skip what only CUDA prints).
--only: names above (first_step selects its four runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLI = ["-m", "mimo_builder.cli"]
TORCHRUN = ["-m", "torch.distributed.run"]

# The lines mimo_builder prints (mimo_builder/_internal/runtime/monitor.py summary_lines, train.py, cli.py).
STEP = re.compile(r"^step\s+(\d+)/(\d+) \| loss\s+(\S+) \| grad norm\s+(\S+) \|\s+(\d+) tokens/s \|\s+(\d+) ms",
                  re.M)
DONE = re.compile(r"^done: (\d+) steps on (\d+) ranks in ([\d.]+) s; loss (\S+) -> (\S+)", re.M)
ACCURACY = re.compile(r"^accuracy: before ([\d.]+)%, after ([\d.]+)%", re.M)
NOTICE = "compiling GPU kernels for the first step"

ONE_CONFIG = {"MAMBA_DETERMINISTIC": "1", "TRITON_CACHE_AUTOTUNING": "0"}
AUTOTUNE = {"MAMBA_DETERMINISTIC": None, "TRITON_CACHE_AUTOTUNING": "1"}  # None: removed
MODES = {  # first-step mode -> (label, environment)
    "one_config": ("one config per kernel (MAMBA_DETERMINISTIC=1 TRITON_CACHE_AUTOTUNING=0)", ONE_CONFIG),
    "autotune": ("default: autotune, cached (TRITON_CACHE_AUTOTUNING=1, MAMBA_DETERMINISTIC unset)", AUTOTUNE),
}


@dataclasses.dataclass
class Command:
    """One command of the list above: how to run it, its limit, and what it needs."""

    name: str
    group: str
    shown: str  # as a user types it
    argv: list[str]  # after the interpreter
    steps: int
    limit_s: int  # this command's own time limit
    env: dict[str, str | None] = dataclasses.field(default_factory=dict)
    cache: str | None = None  # first-step mode: a fresh TRITON_CACHE_DIR, shared by cold and warm
    phase: str | None = None  # "cold" | "warm"
    reserve_s: int = 0  # time kept back for the commands after it
    after: str | None = None  # runs only when this command passed (warm after cold)


def commands(quick: bool) -> list[Command]:
    """The commands in the order they run (``quick``: small step counts, for CPU)."""
    q = (lambda full, small: small if quick else full)  # noqa: E731
    mamba, avlm, digits, torchrun, first = q(20, 2), q(20, 2), q(400, 20), q(5, 2), q(3, 2)
    digits_args = ["--allow", "examples", "run", "examples/digits_sum.yaml", "--colocate", "--nproc", "1",
                   "--steps", str(digits), "--batch-size", "64", "--log-interval", str(q(50, 10)),
                   "--data", "examples.digits_sum:train_data", "--eval-data", "examples.digits_sum:held_out_data"]
    runs = [
        Command("mamba_lm", "mamba_lm", f"mimo-builder run graphs/mamba_lm.yaml --nproc 1 --steps {mamba}",
                [*CLI, "run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", str(mamba)], mamba, 90),
        Command("avlm", "avlm", f"mimo-builder run graphs/avlm.yaml --colocate --nproc 1 --steps {avlm}",
                [*CLI, "run", "graphs/avlm.yaml", "--colocate", "--nproc", "1", "--steps", str(avlm)], avlm, 90),
        Command("digits", "digits", "mimo-builder " + " ".join(digits_args), [*CLI, *digits_args], digits, 150),
        Command("torchrun", "torchrun",
                f"torchrun --nproc-per-node 1 -m mimo_builder.cli run graphs/mamba_lm.yaml --steps {torchrun}",
                [*TORCHRUN, "--nproc-per-node", "1", *CLI, "run", "graphs/mamba_lm.yaml", "--steps", str(torchrun)],
                torchrun, 90),
    ]
    first_args = ["run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", str(first), "--log-interval", "1"]
    # One config per kernel first: its figures are sure to fit; the cold autotuning run, whose
    # length is the open question, then gets what is left (keeping enough for its warm run).
    for mode, limits in (("one_config", (120, 60)), ("autotune", (300, 60))):
        label, env = MODES[mode]
        shown = " ".join(f"{k}={v}" for k, v in env.items() if v is not None)
        for phase, limit in zip(("cold", "warm"), limits):
            runs.append(Command(
                f"first_step_{mode}_{phase}", "first_step", f"{shown} mimo-builder {' '.join(first_args)}",
                [*CLI, *first_args], first, limit, env=env, cache=mode, phase=phase,
                reserve_s=45 if phase == "cold" and mode == "autotune" else 0,
                after=f"first_step_{mode}_cold" if phase == "warm" else None))
    return runs


# ------------------------------------------------------------------ reading a log


def parse(text: str) -> dict:
    """The figures a run printed: step lines, the done line, held-out accuracy, the compile notice."""
    steps = [{"step": int(m[1]), "of": int(m[2]), "loss": float(m[3]), "ms": int(m[6])} for m in STEP.finditer(text)]
    figures: dict = {"step_lines": len(steps), "compile_notice": NOTICE in text}
    if steps:
        figures.update(first_step_line=steps[0], last_step_line=steps[-1])
    if done := DONE.search(text):
        figures["done"] = {"steps": int(done[1]), "ranks": int(done[2]), "seconds": float(done[3]),
                           "first_loss": float(done[4]), "last_loss": float(done[5])}
    if accuracy := ACCURACY.search(text):
        figures["accuracy"] = {"before": float(accuracy[1]), "after": float(accuracy[2])}
    return figures


def checks(command: Command, rc: int, figures: dict, cuda: bool) -> list[tuple[str, bool | None]]:
    """(what, passed) for one run; None: does not apply here (CPU)."""
    done = figures.get("done") or {}
    out: list[tuple[str, bool | None]] = [
        ("exit 0", rc == 0),
        (f"done: {command.steps} steps on 1 ranks", done.get("steps") == command.steps and done.get("ranks") == 1),
    ]
    if command.name == "mamba_lm":
        out.append(("loss falls", bool(done) and done["last_loss"] < done["first_loss"]))
    if command.name == "digits":
        out.append(("accuracy line", "accuracy" in figures))
    if command.group == "first_step":
        last = figures.get("last_step_line") or {}
        out.append((f"step lines 1..{command.steps}", (figures.get("first_step_line") or {}).get("step") == 1
                    and last.get("step") == command.steps))
    if command.name == "mamba_lm" or command.group == "first_step":
        out.append((f"'{NOTICE}' printed", figures["compile_notice"] if cuda else None))
    return out


# ------------------------------------------------------------------ running


def _environment(command: Command, caches: pathlib.Path | None) -> tuple[dict, dict]:
    """(the run's environment, what differs from ours, for the log and cli.json)."""
    env, changed = dict(os.environ), {}
    for key, value in command.env.items():
        if value is None:
            env.pop(key, None)
            changed[key] = "unset"
        else:
            env[key] = changed[key] = value
    if command.cache and caches is not None:
        env["TRITON_CACHE_DIR"] = changed["TRITON_CACHE_DIR"] = str(caches / command.cache)
    return env, changed


def run_one(command: Command, python: str, logs: pathlib.Path, caches: pathlib.Path | None, limit: int,
            cuda: bool) -> dict:
    """Run ``command`` under ``timeout limit``, its output to logs/NAME.log; its cli.json entry."""
    env, changed = _environment(command, caches)
    if command.cache and command.phase == "cold":  # a fresh, empty cache
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
        os.makedirs(env["TRITON_CACHE_DIR"])
    argv = ["timeout", "-k", "10", str(limit), python, *command.argv]
    log = logs / f"{command.name}.log"
    header = (f"# {command.shown}\n# argv: {' '.join(argv)}\n# cwd: {ROOT}\n"
              f"# environment: {' '.join(f'{k}={v}' for k, v in changed.items()) or 'as given'}\n")
    print(f"[{time.strftime('%H:%M:%S')}] {command.name}: {command.shown} (limit {limit} s)", flush=True)
    start = time.perf_counter()
    with open(log, "w") as stream:
        stream.write(header)
        stream.flush()
        try:
            rc = subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, timeout=limit + 30).returncode
        except subprocess.TimeoutExpired:
            rc = 137
        wall = time.perf_counter() - start
        stream.write(f"\n# exit {rc} after {wall:.1f} s\n")
    figures = parse(log.read_text(errors="replace"))
    found = checks(command, rc, figures, cuda)
    result = {"name": command.name, "group": command.group, "command": command.shown, "log": f"cli/{log.name}",
              "environment": changed, "limit_s": limit, "rc": rc, "status": _status(rc), "wall_s": round(wall, 1),
              "figures": figures, "checks": found, "ok": all(ok is not False for _, ok in found)}
    if command.cache:
        result.update(mode=command.cache, phase=command.phase)
    print(f"    -> {result['status']}, {wall:.1f} s, checks "
          f"{'passed' if result['ok'] else 'FAILED: ' + ', '.join(t for t, ok in found if ok is False)}", flush=True)
    return result


def _status(rc: int) -> str:
    return {0: "ok", 124: "TIMED OUT", 137: "KILLED (timeout)"}.get(rc, f"FAILED (exit {rc})")


def _not_run(command: Command, why: str) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {command.name}: not run ({why})", flush=True)
    result = {"name": command.name, "group": command.group, "command": command.shown, "log": None,
              "environment": {}, "limit_s": 0, "rc": None, "status": f"not run ({why})", "wall_s": None,
              "figures": {}, "checks": [], "ok": False}
    if command.cache:
        result.update(mode=command.cache, phase=command.phase)
    return result


def first_step_table(runs: list[dict]) -> list[dict]:
    """Per mode: the cold run's and the warm run's first step, the warm run's last step, walls."""
    rows = []
    for mode, (label, _) in MODES.items():
        cold, warm = ({r["phase"]: r for r in runs if r.get("mode") == mode}.get(p) for p in ("cold", "warm"))
        if cold is None and warm is None:
            continue

        def ms(run, which):
            line = (run or {}).get("figures", {}).get(which) if run and run["rc"] == 0 else None
            return line["ms"] if line else None

        rows.append({"mode": mode, "label": label, "cold_first_ms": ms(cold, "first_step_line"),
                     "warm_first_ms": ms(warm, "first_step_line"), "later_ms": ms(warm, "last_step_line"),
                     "cold_wall_s": (cold or {}).get("wall_s"), "warm_wall_s": (warm or {}).get("wall_s"),
                     "cold_status": (cold or {}).get("status"), "warm_status": (warm or {}).get("status"),
                     "cold_limit_s": (cold or {}).get("limit_s")})
    return rows


def _device() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "none (no torch)"
    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name()
    return False, "cpu (torch.cuda.is_available() is False)"


def main(argv: list[str] | None = None) -> int:
    """Run the selected commands within the budget, write cli.json, print the tables; 0 when all passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="writes cli.json and cli/NAME.log here")
    parser.add_argument("--budget", type=float, help="seconds for all the commands (default: each its own limit)")
    parser.add_argument("--quick", action="store_true", help="small step counts: a dry run on CPU")
    parser.add_argument("--only", help="comma-separated names: mamba_lm, avlm, digits, torchrun, first_step")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run them with")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget if args.budget is not None else float("inf")
    out = pathlib.Path(args.out).resolve()
    logs = out / "cli"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    selected = commands(args.quick)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {c.name for c in selected} - {c.group for c in selected}
        if unknown:
            parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")
        selected = [c for c in selected if c.name in names or c.group in names]
    cuda, device = _device()
    print(f"device: {device}; budget: {'none' if args.budget is None else f'{args.budget:.0f} s'}", flush=True)
    caches = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-triton-")) if any(c.cache for c in selected) else None
    results: dict[str, dict] = {}
    try:
        for command in selected:
            if deadline == float("inf"):
                left = limit = command.limit_s
            else:
                left = int(deadline - time.monotonic())
                limit = min(command.limit_s, left - command.reserve_s)
            if command.after and command.after in results and not results[command.after]["ok"]:
                results[command.name] = _not_run(command, f"{command.after} did not pass")
            elif limit < (5 if args.quick else 20):
                results[command.name] = _not_run(command, f"kit budget spent: {max(left, 0)} s left")
            else:
                results[command.name] = run_one(command, args.python, logs, caches, limit, cuda)
    finally:
        if caches is not None:
            shutil.rmtree(caches, ignore_errors=True)
    runs = list(results.values())
    report = {"device": device, "cuda": cuda, "quick": args.quick, "budget_s": args.budget,
              "elapsed_s": round(time.monotonic() - started, 1),
              "environment": {k: os.environ.get(k, "unset") for k in
                              ("MAMBA_DETERMINISTIC", "TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_DIR")},
              "runs": runs, "first_step": first_step_table(runs)}
    (out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from gpu_check_report import cli_tables

    print("\n" + "\n".join(cli_tables(report)))
    return 0 if runs and all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
