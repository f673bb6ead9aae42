"""Encoder batching: colocated encoders run every microbatch in one forward and one backward,
and the step is the interleaved step (loss, grad norm, updated weights)."""

import pytest
import torch

from multirank import run_ranks

MICROBATCHES, BATCH, LR = 4, 8, 0.5


def _avlm(placement: str, batched: bool = True):
    """avlm under one of its placements, or ``pp2_backbone``: colocated at dp=2 with the backbone at pp=2."""
    from graphs.avlm import avlm
    from mimo_builder._internal.document.graph import Placement

    graph = avlm("colocated_dp2" if placement == "pp2_backbone" else placement)
    if placement == "pp2_backbone":
        graph.nodes["lm"].placement = Placement(pp=2)
    for node in graph.nodes.values():
        node.batch_microbatches = batched
    return graph


def _valid(graph, world_size):
    from mimo_builder._internal.validation import validate_graph

    return validate_graph(graph, world_size)


def test_colocated_encoders_and_their_projectors_are_batched_and_the_backbone_is_not():
    from mimo_builder._internal.runtime.batching import batched_nodes

    valid = _valid(_avlm("colocated_dp2"), 2)
    assert batched_nodes(valid, MICROBATCHES) == {"vision", "vision_proj", "audio", "audio_proj"}
    assert batched_nodes(valid, 1) == frozenset()  # one microbatch: nothing to batch
    assert batched_nodes(_valid(_avlm("colocated_dp2", batched=False), 2), MICROBATCHES) == frozenset()


def test_encoders_on_their_own_ranks_and_nodes_fed_by_interleaved_ones_stay_interleaved():
    from graphs.avlm import avlm
    from mimo_builder._internal.runtime.batching import batched_nodes

    assert batched_nodes(_valid(avlm("disjoint4"), 4), MICROBATCHES) == frozenset()
    graph = _avlm("colocated_dp2")
    graph.nodes["vision"].batch_microbatches = False  # its projector then waits microbatch by microbatch
    assert batched_nodes(_valid(graph, 2), MICROBATCHES) == {"audio", "audio_proj"}


def test_a_batched_encoder_runs_all_forwards_first_and_all_backwards_after_the_backbone():
    from mimo_builder._internal.runtime.batching import batched_nodes
    from mimo_builder._internal.runtime.pipeline import BACKWARD, FORWARD, plan_graph

    valid = _valid(_avlm("colocated_dp2"), 2)
    plan = plan_graph(valid, MICROBATCHES, batched=batched_nodes(valid, MICROBATCHES))
    ops = [(op.stage.node, op.kind, op.microbatch) for op in plan.order[0]]
    vision = [i for i, (node, _, _) in enumerate(ops) if node == "vision"]
    assert [ops[i] for i in vision[:MICROBATCHES]] == [("vision", FORWARD, m) for m in range(MICROBATCHES)]
    assert vision[:MICROBATCHES] == list(range(vision[0], vision[0] + MICROBATCHES))  # back to back
    first_lm = next(i for i, op in enumerate(ops) if op[0] == "lm")
    last_lm_backward = max(i for i, op in enumerate(ops) if op[:2] == ("lm", BACKWARD))
    assert max(vision[:MICROBATCHES]) < first_lm and min(vision[MICROBATCHES:]) > last_lm_backward
    starts = {op.start for op in plan.order[0] if op.stage.node == "vision" and op.kind == FORWARD}
    assert len(starts) == 1  # one simulated run


def _step(placement: str, batched: bool):
    """One SGD step from the seed's weights: the loss, the grad norm, this rank's weights before and after."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from parity_steps import sgd_steps

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_avlm(placement, batched), seed=5).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    params = {n: dict(unwrap(model.chunks(n)[0]).named_parameters()) for n in model.valid.order}
    start = {n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()}
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=1e9, mcore={"sgd_momentum": 0.0})
    run = sgd_steps(model, params, start, synthetic_batch(model.valid, BATCH, seed=2), [MICROBATCHES], sgd)
    model.close()
    return run[MICROBATCHES]["loss"], run[MICROBATCHES]["norm"], run[MICROBATCHES]["updated"], start


def _both(placement: str):
    """The interleaved step, then the batched one, in the same rank processes."""
    return _step(placement, False), _step(placement, True)


@pytest.mark.parametrize("placement", ["colocated_dp2", "colocated_tp2", "pp2_backbone"])
def test_a_batched_step_equals_the_interleaved_step(placement):
    """The same seed on the same placement: each rank's shards after the step, compared rank by rank."""
    interleaved, batched = zip(*run_ranks(2, _both, placement))
    for (loss, norm, updated, start), (ref_loss, ref_norm, ref_updated, ref_start) in zip(batched, interleaved):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and abs(norm - ref_norm) <= 1e-5 * ref_norm
        for name, params in ref_updated.items():
            for key, expected in params.items():
                assert torch.equal(start[name][key], ref_start[name][key])
                diff = (updated[name][key] - expected).abs().max()
                assert diff <= 1e-5 * max(expected.abs().max(), 1e-3), (name, key, float(diff))
    ref_updated, ref_start = interleaved[0][2], interleaved[0][3]
    assert any(not torch.equal(ref_start["vision"][k], v) for k, v in ref_updated["vision"].items())


def test_plan_names_the_batched_nodes_and_batches_none_where_the_memory_would_not_hold_them():
    import json

    from cli_in_process import main_in_process

    common = ("plan", "graphs/avlm.yaml", "--world-size", "2", "--colocate", "--microbatches", "4", "--json")
    roomy = main_in_process(*common)
    assert roomy.returncode == 0, roomy.stderr
    assert json.loads(roomy.stdout)["schedule"]["batched"] == ["audio", "audio_proj", "vision", "vision_proj"]
    tight = main_in_process(*common, "--gpu-memory", "1MB")  # the interleaved plan does not fit either
    assert tight.returncode == 0, tight.stderr
    assert json.loads(tight.stdout)["schedule"]["batched"] == []
