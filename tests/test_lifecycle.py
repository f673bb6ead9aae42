"""What a run leaves behind: nothing.

- build -> step -> close cycles in one process keep threads and file handles flat (the model's
  groups, the schedule's and the watchdog's are released; MCore's per-instance method caches
  are cleared);
- a rank never outlives its launcher: SIGTERM, SIGINT and SIGKILL of the launching process
  end every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from multirank import run_ranks

CYCLES, SETTLED = 12, 4  # a leaked gloo group shows as 3 more threads every cycle


def _cycles(n: int) -> list[tuple[int, int]]:
    """(threads, open files) of this rank after each build -> step -> close cycle."""
    import gc

    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    me, counts = psutil.Process(), []
    for _ in range(n):
        (model,) = CompositeBuilder(mamba_lm(), seed=1).build_distributed_models(
            ddp_config=DistributedDataParallelConfig())
        with model:
            schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, total_steps=2)
            optimizer.zero_grad()
            optimizer.step(schedule.forward_backward(synthetic_batch(model.valid, 2, seed=1)))
        del model, schedule, optimizer
        gc.collect()
        counts.append((me.num_threads(), me.num_fds()))
    return counts


def test_build_step_close_cycles_keep_threads_and_files_flat():
    (counts,) = run_ranks(1, _cycles, CYCLES)
    assert counts[-1] == counts[SETTLED - 1], counts  # each leaked gloo group costs 3 threads, 4 files


# --- no orphans ------------------------------------------------------------------------------------

LAUNCHER = textwrap.dedent("""
    import sys, time
    from mimo_builder._internal.platform.launch import launch

    def wait_forever(folder):
        import os, pathlib
        pathlib.Path(folder, str(os.getpid())).touch()
        time.sleep(600)

    if __name__ == "__main__":
        launch(wait_forever, 2, sys.argv[1], timeout_s=600)
""")


def _rank_pids(folder: Path, expected: int, launcher: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 120
    while len(list(folder.iterdir())) < expected:
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.2)
    return [int(p.name) for p in folder.iterdir()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_ranks_end_with_their_launcher(tmp_path, signum):
    script, folder = tmp_path / "launcher.py", tmp_path / "ranks"
    script.write_text(LAUNCHER)
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), *sys.path]))
    # as from a terminal: a suite started as a shell's background job inherits SIGINT ignored
    launcher = subprocess.Popen([sys.executable, str(script), str(folder)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids: list[int] = []
    try:
        pids = _rank_pids(folder, 2, launcher)
        launcher.send_signal(signum)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), f"ranks {pids} outlived their launcher ({signum.name})"
    finally:
        launcher.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
