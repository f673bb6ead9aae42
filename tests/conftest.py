import os

import pytest

from leftovers import adopt_orphans, end_leftovers

# Keep each rank to one intra-op thread: the suite runs several gloo ranks per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_WORKER_LEFTOVERS = pytest.StashKey[list]()

SLOW_MODULES = frozenset("""
    test_balance test_batches test_bridge test_checkpoint test_context_expert test_control_plane test_copies
    test_damaged_checkpoints test_data test_distributed test_encoder_batching test_encoders test_energon
    test_async_save test_export_cli test_extending test_forward_outputs test_free_running test_generate test_generate_cli
    test_gpt_tensor_parallel test_gpu_check test_hf_import test_hf_llava test_hf_siglip test_hf_nemotron_h test_hf_omni
    test_hf_parakeet test_hf_radio
    test_interop test_label_free_generation test_launch test_leftovers test_lifecycle test_llava_data test_lora test_lora_checkpoints
    test_mamba test_multinode test_optimizer test_packing test_parity test_per_token_loss test_pipeline
    test_place test_plan_estimates test_port_contract test_preemption test_ragged_items test_ragged_plan
    test_ready_graphs test_references test_reliability test_restarts test_resume test_runtime
    test_sampling_streams test_sdpa_attention test_seed_placement test_strict_p2p test_throughput
    test_vocab_padding test_walker
""".split())
"""Modules whose tests start ranks (gloo process groups, launched runs): all ``slow``, so that
``-m "not slow"`` is the quick tier. Modules that mix such tests with quick ones mark theirs."""


def pytest_configure(config):
    """Adopt orphans (here and in each xdist worker): the end-of-session check must see them."""
    adopt_orphans()


LONGEST_FIRST = """
    test_gpu_check test_compat test_lifecycle test_restarts test_hf_omni test_preemption test_checkpoint
    test_launch test_hf_llava test_multinode test_imports test_reliability test_public_api test_cli
""".split()
"""The modules that took longest (2026-12-07, in that order), collected first: xdist hands out
whole files (``--dist loadfile``) in collection order, and one of these handed out last kept a
worker busy a minute after the others had finished."""


def pytest_collection_modifyitems(config, items):
    """Mark every test of :data:`SLOW_MODULES` ``slow``; :data:`LONGEST_FIRST` first."""
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.stem, len(first)))  # stable: the rest in their order


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
