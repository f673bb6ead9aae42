"""The acceptance test: one training step of the vlm graph gives the same loss and the same
updated parameters on every placement as on one rank, from the same master weights."""

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

BATCH, LR = 4, 0.5
# SGD, not Adam: Adam's first step is lr * g / (|g| + eps), which turns rounding noise in
# near-zero gradients into full-size differences; SGD's update is the gradient itself.


def _build(placement):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm(placement), seed=3).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    return model


def _one_step(model):
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.5, mcore={"sgd_momentum": 0.0})
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, sgd)
    batch = synthetic_batch(model.valid, BATCH, seed=11)
    optimizer.zero_grad()
    loss = schedule.forward_backward(batch)
    norm = optimizer.step().grad_norm
    return loss, norm


def _reference():
    """On one rank: the master weights, and the loss and weights after one step."""
    from mimo_builder._internal.assembly.tp_shard import unwrap

    model = _build("single")
    initial = {n: {k: p.detach().clone() for k, p in unwrap(model.chunks(n)[0]).named_parameters()}
               for n in model.valid.order}
    loss, norm = _one_step(model)
    updated = {n: {k: p.detach().clone() for k, p in unwrap(model.chunks(n)[0]).named_parameters()}
               for n in model.valid.order}
    return initial, loss, norm, updated


def _placed_step(placement, initial):
    from mimo_builder._internal.assembly.tp_shard import unshard, unwrap

    from parity_steps import load_initial

    model = _build(placement)
    load_initial(model, initial)
    loss, norm = _one_step(model)
    updated = {}
    for name in model.valid.order:
        if model.hosts(name):
            tp = model.pg_collection(name).tp
            full = {k: unshard(p, initial[name][k].shape, tp) for k, p in unwrap(model.chunks(name)[0]).named_parameters()}
            if model.valid.layouts[name].coords(dist.get_rank()) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0}:
                updated[name] = full
    return loss, norm, updated


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _reference)[0]


@pytest.mark.parametrize("placement, nproc", [
    ("colocated_tp2", 2), ("colocated_dp2", 2), ("disjoint4", 4),
])
def test_one_step_matches_the_single_rank_run(reference, placement, nproc):
    initial, ref_loss, ref_norm, ref_updated = reference
    results = run_ranks(nproc, _placed_step, placement, initial)
    assert all(abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) for loss, _, _ in results), (
        [r[0] for r in results], ref_loss)
    assert all(abs(norm - ref_norm) <= 1e-5 * ref_norm for _, norm, _ in results)
    updated = {name: params for _, _, part in results for name, params in part.items()}
    assert updated.keys() == ref_updated.keys()
    for name, params in ref_updated.items():
        for key, expected in params.items():
            moved = (expected - initial[name][key]).abs().max()
            diff = (updated[name][key] - expected).abs().max()
            assert diff <= 1e-5 * max(expected.abs().max(), 1e-3), (name, key, float(diff), float(moved))
    assert any(not torch.equal(initial["lm"][k], v) for k, v in ref_updated["lm"].items())  # the step moved
