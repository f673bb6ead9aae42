"""Preemption: SIGTERM or SIGUSR1 to the launcher stops every rank after the same step, saves it,
exits with the documented status, and ``--resume`` then continues exactly."""

import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import time

from cli_in_process import run_in_process
from mimo_builder._internal.errors import EXIT_PREEMPTED

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = pathlib.Path(sys.executable).parent / "mimo-builder"
STEPS = 12
RUN = ("run", "graphs/mamba_lm.yaml", "--nproc", "2", "--batch-size", "4", "--log-interval", "1", "--steps", str(STEPS))


def _losses(stdout: str) -> dict[int, str]:
    return {int(line.split("|")[0].split()[1].split("/")[0]): line.split("|")[1].split()[1]
            for line in stdout.splitlines() if line.startswith("step")}


def _signal_after_step(args, signum, step: int) -> subprocess.CompletedProcess:
    """Start the command, send ``signum`` once it printed step ``step``, and wait for its end."""
    proc = subprocess.Popen([str(CLI), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            line = proc.stdout.readline() if ready else ""
            seen.append(line)
            if re.match(rf"step +{step}/", line):
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, "".join(seen) + out, err)


def _stopped(root: pathlib.Path, signum) -> tuple[subprocess.CompletedProcess, int]:
    """The job stopped by ``signum`` sent once it printed step 3: checked, with its last step."""
    stopped = _signal_after_step((*RUN, "--save", str(root), "--resume"), signum, step=3)
    assert stopped.returncode == EXIT_PREEMPTED == 85, stopped.stderr[-3000:]  # documented: docs/training.md
    last = max(_losses(stopped.stdout))
    assert 3 <= last < STEPS
    name = signal.Signals(signum).name
    assert f"stopped: stopped after step {last} of {STEPS} for {name} (preemption); step {last} is saved in {root}" \
        in stopped.stderr, stopped.stderr[-3000:]
    assert (root / "latest").read_text().strip() == f"step_{last:07d}"
    assert "Traceback" not in stopped.stderr
    return stopped, last


def test_sigterm_to_the_launcher_saves_the_step_and_resume_continues_exactly(tmp_path, capfd):
    """The signal goes to the command's own process, as a scheduler sends it; the straight run
    and the resumed one run in the test process (their output is the same)."""
    root = tmp_path / "ckpt"
    stopped, last = _stopped(root, signal.SIGTERM)
    result = run_in_process(capfd, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = _losses(result.stdout)
    resumed = run_in_process(capfd, *RUN, "--save", str(root), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root} at step {last}" in resumed.stdout
    assert _losses(resumed.stdout) == {k: v for k, v in straight.items() if k > last}
    assert _losses(stopped.stdout) == {k: v for k, v in straight.items() if k <= last}


def test_sigusr1_to_the_launcher_stops_every_rank_after_a_saved_step(tmp_path):
    _stopped(tmp_path / "ckpt", signal.SIGUSR1)  # Slurm's --signal=USR1@90; resuming is the same as above
