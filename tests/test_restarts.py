"""Restarts under torchrun's elastic agent: random ranks SIGKILLed at random moments (in a step,
and while a save is being written) restart the job, which resumes from its last complete step and
ends with weights bitwise equal to an uninterrupted run's.

``run --save DIR --resume`` is the whole recipe: ``torchrun --max-restarts N`` starts the ranks
again and the same command continues from the latest step under DIR.
"""

import pathlib
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time

import torch
from cli_in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"
STEPS, EVERY = 16, 4
COMMAND = ("-m", "mimo_builder.cli", "run", "graphs/mamba_lm.yaml", "--steps", str(STEPS), "--batch-size", "4",
           "--log-interval", "1", "--save-interval", str(EVERY), "--resume")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(save: pathlib.Path, restarts: int) -> list[str]:
    return [str(TORCHRUN), "--nproc-per-node", "2", "--max-restarts", str(restarts), "--master-port",
            str(_free_port()), *COMMAND, "--save", str(save)]


def _ranks(save: pathlib.Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"python -u -m mimo_builder.cli run .* --save {save}$"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _run_with_kills(save: pathlib.Path, kills: list[tuple[int, float]]) -> tuple[subprocess.CompletedProcess, list]:
    """The job, with rank processes SIGKILLed once each (step, delay) of ``kills`` is reached;
    returns the result and, per fault, the step killed at and the seconds until it resumed."""
    proc = subprocess.Popen(_torchrun(save, restarts=len(kills)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, faults, pending, rng = [], [], list(kills), random.Random(7)
    killed_at, deadline = None, time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            line = proc.stdout.readline() if ready else ""
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if killed_at is not None and line.startswith("--resume:"):  # the next attempt has started
                faults.append((killed_at[0], time.monotonic() - killed_at[1]))
                killed_at = None
            match = re.match(r"step +(\d+)/", line)
            if match and pending and int(match.group(1)) == pending[0][0]:
                step, delay = pending.pop(0)
                time.sleep(delay)
                victims = _ranks(save)
                if victims:
                    victim = rng.choice(victims)
                    subprocess.run(["kill", "-9", str(victim)])
                    killed_at = (step, time.monotonic())
        proc.wait(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), ""), faults


def _weights(step_dir: pathlib.Path, out: pathlib.Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_dir), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_three_killed_ranks_restart_and_end_bitwise_equal_to_an_uninterrupted_run(tmp_path, capfd):
    # the uninterrupted run under the project's own launcher (2 ranks, as torchrun's): the same weights
    straight = run_in_process(capfd, *COMMAND[2:], "--nproc", "2", "--save", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    rng = random.Random(2026)
    # in a step (a random moment of it) twice, and right after a save began (step 8 saves)
    kills = sorted([(rng.randint(2, 6), rng.uniform(0.0, 0.08)), (8, 0.01), (rng.randint(10, 14), rng.uniform(0.0, 0.08))])
    result, faults = _run_with_kills(tmp_path / "killed", kills)
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(faults) == 3, f"expected three restarts, saw {faults}\n{result.stdout[-4000:]}"
    starts = [int(m.group(1) or 0) for m in re.finditer(
        r"^--resume: .*\n(?:(?!--resume:).*\n)*?(?:resumed from \S+ at step (\d+)|step +1/)", result.stdout, re.M)]
    assert len(starts) == 4 and starts[0] == 0, f"one start and three restarts, each from its last step: {starts}"
    for (step, _), resumed in zip(faults, starts[1:]):
        assert step - resumed <= EVERY, f"killed at step {step}, resumed at {resumed}: lost more than {EVERY} steps"
    print("restart seconds per fault:", [round(s, 1) for _, s in faults])
    ours = _weights(tmp_path / "killed" / f"step_{STEPS:07d}", tmp_path / "killed.pt")
    theirs = _weights(tmp_path / "straight" / f"step_{STEPS:07d}", tmp_path / "straight.pt")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors that differ from the uninterrupted run: {different[:10]}"
