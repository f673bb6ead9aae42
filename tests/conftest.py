import os

import pytest

from leftovers import adopt_orphans, end_leftovers

# Keep each rank to one intra-op thread: the suite runs several gloo ranks per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_WORKER_LEFTOVERS = pytest.StashKey[list]()


def pytest_configure(config):
    """Adopt orphans (here and in each xdist worker): the end-of-session check must see them."""
    adopt_orphans()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Collect what an xdist worker found left running at its session end."""
    found = getattr(node, "workeroutput", {}).get("leftovers", [])
    node.config.stash.setdefault(_WORKER_LEFTOVERS, []).extend(f"[{node.gateway.id}] {line}" for line in found)


def pytest_sessionfinish(session):
    """Fail the run if a process the tests started outlives them (each xdist worker checks its own)."""
    config = session.config
    lines = end_leftovers(skip=_xdist_worker)
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller reports and fails the run
        config.workeroutput["leftovers"] = lines
        return
    lines += config.stash.get(_WORKER_LEFTOVERS, [])
    if lines:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")  # after the progress line
            reporter.write_sep("=", f"FAILED: {len(lines)} process(es) the tests started outlived them (now killed)",
                               red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = session.exitstatus or pytest.ExitCode.TESTS_FAILED


def _xdist_worker(cmdline: str) -> bool:
    """An xdist worker (an execnet gateway process): it checks its own descendants."""
    try:
        from execnet.gateway_io import popen_bootstrapline
    except ImportError:
        return False
    return popen_bootstrapline in cmdline


STRICT_P2P_MODULES = {"test_pipeline", "test_runtime", "test_parity", "test_checkpoint", "test_context_expert"}
"""Suites that run under NCCL's point-to-point rules (``MIMO_BUILDER_P2P=strict``): every
pipelined step, bridge and checkpoint path must keep them, though gloo alone would not tell."""


@pytest.fixture(scope="module", autouse=True)
def _strict_p2p_for_the_runtime_suites(request):
    """Strict P2P for the ranks these modules spawn (module fixtures included: autouse first)."""
    if request.module.__name__ not in STRICT_P2P_MODULES:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIMO_BUILDER_P2P", "strict")
        yield
