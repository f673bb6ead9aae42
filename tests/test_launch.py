"""The launch helper: results in rank order; a failing rank stops every rank with its traceback."""

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from mimo_builder._internal.platform.launch import RankError, launch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rank_and_sum():
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), float(value)


def _raise_on_rank(bad_rank):
    if dist.get_rank() == bad_rank:
        raise ValueError(f"injected failure on rank {bad_rank}")
    dist.barrier()  # the healthy ranks wait on a collective that never completes
    return "unreachable"


def _exit_on_rank(bad_rank):
    if dist.get_rank() == bad_rank:
        os._exit(3)
    dist.barrier()


def test_results_come_back_in_rank_order():
    results = launch(_rank_and_sum, 3, timeout_s=120)
    assert results == [(r, 3, 6.0) for r in range(3)]


def test_a_raising_rank_stops_all_ranks_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError) as err:
        launch(_raise_on_rank, 4, 2, timeout_s=120)
    assert time.monotonic() - start < 30
    assert err.value.rank == 2
    assert "injected failure on rank 2" in err.value.trace
    assert "_raise_on_rank" in err.value.trace  # the traceback, not only the message


def test_a_rank_that_dies_is_reported():
    with pytest.raises(RankError) as err:
        launch(_exit_on_rank, 2, 1, timeout_s=120)
    assert err.value.rank == 1
    assert "exited with code 3" in err.value.trace


def test_timeout_is_an_error_not_a_hang():
    with pytest.raises(RankError, match="timed out"):
        launch(time.sleep, 1, 30, timeout_s=3)


def _rank_state():
    try:
        torch.zeros(1, device="cuda")
        cuda_error = ""
    except Exception as err:  # no device here: the error must say so, not blame the fork
        cuda_error = str(err)
    return dict(cuda_usable=not torch._C._cuda_isInBadFork(), forked_advice="spawn" in cuda_error,
                stack_imported=all(m in sys.modules for m in ("megatron.core.optimizer", "submodels.mamba",
                                                               "mimo_builder._internal.runtime.train")),
                marker=os.environ.get("MIMO_TEST_LAUNCH_ENV"), folder=os.getcwd())


def test_ranks_find_the_stack_imported_can_use_cuda_and_see_the_launchers_environment(monkeypatch, tmp_path):
    """Ranks fork from a server that imported the stack (Megatron-Core, the runtime, the builders)
    without asking the driver about CUDA (asking marks the server so that torch refuses CUDA in
    every forked rank, whose CUDA errors would then advise 'spawn'), and each rank gets the
    launcher's environment and folder as they are at launch time, not the server's."""
    launch(_rank_and_sum, 1, timeout_s=120)  # the fork server is up before the variable is set
    monkeypatch.setenv("MIMO_TEST_LAUNCH_ENV", "now")
    monkeypatch.chdir(tmp_path)
    expected = dict(cuda_usable=True, forked_advice=False, stack_imported=True, marker="now", folder=str(tmp_path))
    assert launch(_rank_state, 2, timeout_s=120) == [expected] * 2


# --- the backend follows the device ------------------------------------------------------------

def _fake_gpus(monkeypatch, count: int) -> list:
    """CUDA "available" with ``count`` devices, and launch's spawn replaced by a recorder."""
    import mimo_builder._internal.platform.launch as launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    calls = []
    monkeypatch.setattr(launcher, "_spawn", lambda fn, nproc, args, *rest: calls.append((nproc, rest)) or [])
    return calls


def test_spawned_ranks_on_a_cuda_machine_use_nccl(monkeypatch):
    """The spawn path takes the device's backend, as torchrun does; gloo stays for CPU."""
    from mimo_builder._internal.platform.launch import default_backend

    assert default_backend() == "gloo"  # this machine
    calls = _fake_gpus(monkeypatch, 2)
    assert default_backend() == "nccl"
    launch(_rank_and_sum, 2)
    (nproc, (timeout_s, init_timeout_s, backend, strict)), = calls
    assert (nproc, backend, strict) == (2, "nccl", False)


def test_strict_p2p_never_reaches_nccl_ranks(monkeypatch):
    monkeypatch.setenv("MIMO_BUILDER_P2P", "strict")
    calls = _fake_gpus(monkeypatch, 1)
    launch(_rank_and_sum, 1)
    assert calls[0][1][2:] == ("nccl", False)


def test_more_nccl_ranks_than_gpus_is_named_before_spawning(monkeypatch):
    from mimo_builder._internal.platform.launch import LaunchError

    calls = _fake_gpus(monkeypatch, 1)
    with pytest.raises(LaunchError, match="--nproc 4: NCCL ranks need a GPU each, and this machine has 1"):
        launch(_rank_and_sum, 4)
    assert calls == []


def test_control_groups_are_gloo_on_any_device():
    """The groups that carry the project's own messages (failure agreement, norms, watchdog) are
    made with backend="gloo" and CPU tensors; every other group takes the default backend."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "mimo_builder"
    explicit = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("new_group",
                                                                                   "new_subgroups_by_enumeration"):
                backend = next((k.value for k in node.keywords if k.arg == "backend"), None)
                if isinstance(backend, ast.Constant):
                    explicit.append((path.name, backend.value))
    assert explicit and {value for _, value in explicit} == {"gloo"}, explicit


# --- the fork server starts with the command ------------------------------------------------------

_EARLY = """
import multiprocessing.forkserver as forkserver, sys
from mimo_builder.cli import main
started = []
real = forkserver.ensure_running
def ensure_running():
    started.append("torch" in sys.modules)
    return real()
forkserver.ensure_running = ensure_running
code = main(["run", "graphs/mamba_lm.yaml", "--nproc", "1", "--batch-size", "3", "--microbatches", "2"])
print(code, started[0], forkserver._forkserver._forkserver_pid, flush=True)
"""


def test_a_launching_command_starts_the_fork_server_before_its_own_imports_and_ends_it():
    """`run` starts the server that preloads the stack before it imports torch itself (the two
    imports overlap), and a command that ends with a named error leaves no server importing on."""
    result = subprocess.run([sys.executable, "-c", _EARLY], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    code, torch_before, pid = result.stdout.split()
    assert (code, torch_before) == ("2", "False"), result.stdout + result.stderr
    assert "not divisible by 2 microbatch(es)" in result.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)  # the server ended with the command (stopped, and reaped)


def _say(text):
    # one write per line: the ranks write to one file at once, and print() may write a line in parts
    os.write(sys.stdout.fileno(), f"rank {dist.get_rank()}: {text}\n".encode())
    os.write(sys.stderr.fileno(), f"rank {dist.get_rank()} on stderr\n".encode())


def test_ranks_write_where_the_launchers_output_points_at_launch(tmp_path):
    """Ranks fork from a server that may have started long before (with the launcher's output
    pointing elsewhere then): each rank writes to the launcher's stdout and stderr of now."""
    launch(_say, 1, "before", timeout_s=120)  # the server is up, with the output of then
    out, err = tmp_path / "out", tmp_path / "err"
    saved = os.dup(1), os.dup(2)
    try:
        with open(out, "wb") as o, open(err, "wb") as e:
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            launch(_say, 2, "now", timeout_s=120)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    assert sorted(out.read_text().splitlines()) == ["rank 0: now", "rank 1: now"]
    assert sorted(line for line in err.read_text().splitlines() if line.startswith("rank")) == \
        ["rank 0 on stderr", "rank 1 on stderr"]
