"""More than one machine, on torchrun's c10d rendezvous: two agents on this machine stand for two
nodes of two ranks each (what the README's multi-node launch and ``examples/slurm.sbatch`` run).

The graph trains across both agents; then the agent that does not serve the rendezvous is killed
with SIGKILL. Its ranks stop with it (they watch their agent), and the surviving agent's ranks
end with a message that names what died: the killed agent's ranks, or, when it held ranks 0-1
and with them the workers' store, the store.
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


def _rendezvous_host(agents: list[subprocess.Popen], port: int) -> subprocess.Popen:
    """The agent that serves the rendezvous store (the first to bind the endpoint)."""
    import psutil

    for _ in range(300):
        for agent in agents:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(agent.pid).net_connections()):
                return agent
        time.sleep(0.1)
    raise AssertionError("no agent serves the rendezvous store")


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
        rendezvous = _rendezvous_host(agents, port)  # killing it would end torchrun itself
        _wait_for(logs, r"step +3/400 \| loss", timeout_s=150)  # four ranks train across both agents
        victim = next(agent for agent in agents if agent is not rendezvous)
        victim.send_signal(signal.SIGKILL)
        assert rendezvous.wait(timeout=90) != 0
        text = logs[agents.index(rendezvous)].read_text()
        assert "mimo_builder/" not in text, text[-3000:]  # no traceback of ours (torchrun prints its own)
        if re.search(r"step +3/400", text):  # the survivor holds ranks 0-1: the victim's ranks are named
            assert {int(r) for r in re.findall(r"rank (\d+) is not responding", text)} == {2, 3}, text[-3000:]
            assert "most likely dead" in text, text[-3000:]
        else:  # the victim held ranks 0-1 and the workers' store: the survivors say the store is gone
            assert "is unreachable: the process hosting it" in text, text[-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
