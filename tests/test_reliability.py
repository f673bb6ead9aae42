"""Failures inside a step: the same root cause on every rank, fast, and a graph that rebuilds.

Faults are injected from here only (a module's forward or an optimizer's update replaced on one
rank, a rank that stops itself with SIGSTOP); nothing in the project knows about them.

- a forward that raises on rank 0 of a disjoint graph (4 ranks): every rank raises StepError
  naming rank 0, the node and the phase; the caller builds again and trains;
- an optimizer update that raises on one rank: every rank raises OptimizerStepError with that
  rank's message; the caller builds again and the step's loss is the clean run's;
- a rank that fails before the gradient norm's collective leaves its peers blocked there: their
  watchdogs end them, and the launcher reports the published root cause within 60 s;
- a rank stopped by SIGSTOP: the step timeout fires and names the silent rank;
- a failure caught earlier in the run does not stand in for a later, unrelated one.
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from mimo_builder._internal.platform.launch import RankError, launch
from multirank import run_ranks

BATCH, SEED = 4, 3


def _build(placement: str, step_timeout_s: float | None = None, first_step_timeout_s: float | None = None):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm(placement), seed=1, step_timeout_s=step_timeout_s,
                                first_step_timeout_s=first_step_timeout_s).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    return model, GraphSchedule(model), GraphOptimizer(model, total_steps=4)


def _step(run, poisoned_share: bool = False) -> float:
    """One step; with ``poisoned_share`` each rank passes its own share, rank 0's pixels NaN."""
    import torch.distributed as dist

    from mimo_builder._internal.runtime.shards import RankBatch
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model, schedule, optimizer = run
    optimizer.zero_grad()
    batch = synthetic_batch(model.valid, BATCH, seed=SEED)
    if poisoned_share:
        batch = RankBatch.from_global(model.valid, batch, dist.get_rank(), 2)
        if dist.get_rank() == 0:
            batch.rows["pixel_values"][0, 0, 0, 0] = float("nan")
    loss = schedule.forward_backward(batch, 2)
    optimizer.step(loss)
    return loss


def _raise(*args, **kwargs):
    raise RuntimeError("injected fault")


def _first_hosted(model, names):
    return next(n for n in names if model.hosts(n))


# --- caught failures, then a rebuild --------------------------------------------------------------

def _caught_then_rebuilt(placement: str) -> dict:
    """Attempt 1: a forward raises on rank 0. Attempt 2: an optimizer update raises on the last
    rank. Attempt 3: rank 0's own share of the batch holds a NaN pixel. Attempt 4: clean. The
    caller catches each failure, closes the model and builds again."""
    import torch.distributed as dist

    from mimo_builder._internal.runtime.optim import OptimizerStepError
    from mimo_builder._internal.runtime.schedule import StepError

    rank, last = dist.get_rank(), dist.get_world_size() - 1
    out = {}
    for attempt in ("forward", "optimizer", "batch", "clean"):
        start = time.monotonic()
        run = _build(placement)
        with run[0] as model:
            if attempt == "forward" and rank == 0:
                model.chunks(_first_hosted(model, ("vision", "lm")))[0].forward = _raise
            if attempt == "optimizer" and rank == last:
                run[2].nodes[_first_hosted(model, ("lm", "proj"))].optimizer.step_with_ready_grads = _raise
            try:
                out[attempt] = ("ok", _step(run, poisoned_share=attempt == "batch"))
            except (StepError, OptimizerStepError) as err:
                out[attempt] = (type(err).__name__, str(err))
        out[f"{attempt}_s"] = time.monotonic() - start
    return out


@pytest.fixture(scope="module")
def caught():
    return run_ranks(4, _caught_then_rebuilt, "disjoint4")


def test_a_forward_failure_is_the_same_step_error_on_every_rank(caught):
    for r in caught:
        kind, message = r["forward"]
        assert kind == "StepError", r
        assert message.startswith("rank 0, node 'vision' forward (microbatch 0): RuntimeError: injected fault"), message
        assert r["forward_s"] < 60, r


def test_a_bad_share_of_the_batch_on_one_rank_is_the_same_error_on_every_rank(caught):
    for r in caught:
        kind, message = r["batch"]
        assert kind == "StepError", r
        assert message.startswith("rank 0, its share of the batch: "), message
        assert "pixel_values" in message and "not finite" in message, message
        assert r["batch_s"] < 60, r


def test_an_optimizer_failure_is_the_same_error_on_every_rank(caught):
    for r in caught:
        kind, message = r["optimizer"]
        assert kind == "OptimizerStepError", r
        assert message.startswith("rank 3, optimizer of node 'lm' (update): RuntimeError: injected fault"), message


def test_the_rebuilt_graph_trains_like_a_fresh_one(caught):
    losses = {r["clean"] for r in caught}
    ((kind, loss),) = losses  # the same on every rank
    assert kind == "ok" and math.isfinite(loss)


# --- failures that leave peers blocked --------------------------------------------------------------

def _fails_before_the_norm():
    """Rank 1 raises in its gradient preparation; rank 0 waits in the norm's collective."""
    import torch.distributed as dist

    run = _build("colocated_dp2")
    if dist.get_rank() == 1:
        run[2].nodes["lm"].optimizer.prepare_grads = _raise
    try:
        _step(run)
    except Exception:  # noqa: BLE001 - the caller of a real job would catch and rebuild
        _build("colocated_dp2")  # rank 1 goes on; rank 0 stays blocked until its watchdog acts
    time.sleep(120)


def _stops_itself(step_timeout_s: float):
    """Rank 1 stops (SIGSTOP) inside its second step's forward."""
    import torch.distributed as dist

    run = _build("colocated_dp2", step_timeout_s=step_timeout_s, first_step_timeout_s=120)
    _step(run)
    if dist.get_rank() == 1:
        run[0].chunks("lm")[0].register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGSTOP))
    _step(run)
    time.sleep(120)


def _launch_expecting_failure(body, *args) -> tuple[RankError, float]:
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(body, 2, *args, timeout_s=150)
    return info.value, time.monotonic() - start


def test_peers_blocked_behind_a_failed_rank_end_with_its_cause():
    err, seconds = _launch_expecting_failure(_fails_before_the_norm)
    assert err.rank == 1, err
    assert "rank 1, optimizer of node 'lm' (gradient sync): RuntimeError: injected fault" in err.trace, err.trace
    assert seconds < 60 + 30, seconds  # 30 s: two ranks importing the stack on a loaded machine


def test_a_stopped_rank_is_named_by_the_step_timeout():
    err, seconds = _launch_expecting_failure(_stops_itself, 10.0)
    assert err.rank == 1, err
    assert "step 2 made no progress in forward_backward for 10 s (step timeout)" in err.trace, err.trace
    assert "silent: rank 1 is not responding (last reported: step 2, node 'lm' forward (microbatch 0))" in err.trace, \
        err.trace  # stopped right after the schedule noted it: the node, not only the phase
    assert seconds < 60 + 30, seconds


def _caught_then_fails_elsewhere():
    """A step failure is published and caught; later rank 0 raises outside any step."""
    import torch.distributed as dist

    from mimo_builder._internal.runtime.schedule import StepError

    run = _build("colocated_dp2")
    if dist.get_rank() == 1:
        run[0].chunks("lm")[0].forward = _raise
    with pytest.raises(StepError):
        _step(run)
    if dist.get_rank() == 0:
        raise ValueError("a later, unrelated failure")
    time.sleep(120)


def test_an_old_published_failure_does_not_explain_a_new_one():
    err, _ = _launch_expecting_failure(_caught_then_fails_elsewhere)
    assert err.rank == 0 and "ValueError: a later, unrelated failure" in err.trace, err.trace
