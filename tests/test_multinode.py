"""More than one machine, on torchrun's c10d rendezvous: two agents on this machine stand for two
nodes of two ranks each (what the README's multi-node launch and ``examples/slurm.sbatch`` run).

The graph trains across both agents; then one agent is killed with SIGKILL. Its ranks stop with
it (they watch their agent), and the surviving agent's ranks end with a message that names the
ranks that died, not the connection error they saw.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(port: int, log: Path) -> subprocess.Popen:
    command = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mimo-test-{port}",
               "-m", "mimo_builder.cli", "run", "graphs/avlm.yaml", "--steps", "400", "--batch-size", "4",
               "--log-interval", "1"]
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(paths: list[Path], pattern: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(re.search(pattern, path.read_text()) for path in paths):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout_s} s:\n" + "\n".join(p.read_text()[-2000:] for p in paths))


def test_two_agents_train_together_and_a_killed_agent_is_named(tmp_path):
    port = _free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [_agent(port, log) for log in logs]
    try:
        _wait_for(logs, r"step +3/400 \| loss", timeout_s=150)  # four ranks train across both agents
        # the agent of ranks 0-1 prints the steps and hosts the workers' store; the other one dies
        first = next(i for i, log in enumerate(logs) if re.search(r"step +3/400", log.read_text()))
        agents[1 - first].send_signal(signal.SIGKILL)
        assert agents[first].wait(timeout=90) != 0
        text = logs[first].read_text()
        named = {int(r) for r in re.findall(r"rank (\d+) is not responding", text)}
        assert named == {2, 3}, text[-3000:]  # exactly the killed agent's ranks
        assert "most likely dead" in text, text[-3000:]
        assert "mimo_builder/" not in text, text[-3000:]  # no traceback of ours (torchrun prints its own)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
