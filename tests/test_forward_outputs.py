"""``GraphSchedule.evaluate(batch, outputs=[...])``: any node's output port for the whole batch
on rank 0, equal on every placement to the nodes composed by hand on one rank."""

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

BATCH, REFS = 4, ["vision.embeddings", "proj.output", "lm.logits"]


def _build(placement):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    graph = vlm(placement)  # without labels: the backbone returns its logits (the graph's output)
    for key in ("labels", "loss_mask"):
        del graph.inputs[key]
    graph.outputs = ["lm.logits"]
    (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    return model


def _by_hand(model, batch) -> dict[str, torch.Tensor]:
    """Each node's builder run() on the batch, in graph order, in eval mode (one rank)."""
    produced = {}
    with torch.no_grad():
        for name in model.valid.order:
            chunk = model.chunks(name)[0]
            chunk.eval()
            inputs = {port: batch[key] for key, (node, port) in model.valid.inputs.items() if node == name}
            inputs.update({e.dst_port: produced[e.src][e.src_port] for e in model.valid.edges if e.dst == name})
            produced[name] = model.valid.builders[name].run(chunk, inputs)
            chunk.train()
    return {ref: produced[ref.split(".")[0]][ref.split(".")[1]] for ref in REFS}


def _reference():
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build("single")
    batch = synthetic_batch(model.valid, BATCH, seed=11)
    initial = {n: {k: p.detach().clone() for k, p in unwrap(model.chunks(n)[0]).named_parameters()}
               for n in model.valid.order}
    result = GraphSchedule(model).evaluate(batch, 2, outputs=REFS)
    return initial, _by_hand(model, batch), {ref: result[ref] for ref in REFS}


def _placed(placement, initial):
    from parity_steps import load_initial
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build(placement)
    load_initial(model, initial)
    result = GraphSchedule(model).evaluate(synthetic_batch(model.valid, BATCH, seed=11), 2,
                                           outputs=REFS)
    return {ref: result[ref] for ref in REFS if ref in result} if dist.get_rank() == 0 else result


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _reference)[0]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_one_rank_returns_what_the_nodes_compute_by_hand(reference):
    _, by_hand, returned = reference
    assert returned["vision.embeddings"].shape[0] == BATCH and returned["lm.logits"].shape[-1] == 256
    assert all(_close(returned[ref], by_hand[ref]) for ref in REFS)


@pytest.mark.parametrize("placement, nproc", [("disjoint4", 4), ("colocated_tp2", 2)])
def test_every_placement_returns_the_whole_batch_on_rank_0(reference, placement, nproc):
    initial, by_hand, _ = reference
    results = run_ranks(nproc, _placed, placement, initial)
    first, others = results[0], results[1:]
    assert all(_close(first[ref], by_hand[ref]) for ref in REFS), {r: first[r].shape for r in first}
    assert all(not any(torch.is_tensor(v) for v in r.values()) for r in others)  # tensors on rank 0 only


def test_an_output_that_is_not_a_batch_first_port_is_named():
    from graphs.vlm import vlm
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.runtime.outputs import check_requested
    from mimo_builder._internal.validation import validate_graph

    valid = validate_graph(vlm("single"), 1)
    for ref, message in (("lm.loss", "has no batch axis"), ("lm.hidden", "is not an output port (lm: correct, "),
                         ("eye.out", "no such node"), ("lm", "is not 'node.port'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_requested(valid, [ref])
