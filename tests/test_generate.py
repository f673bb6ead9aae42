"""``GraphSchedule.generate``: incremental decoding (Mamba conv + SSM states, attention KV cache,
MCore's static inference context) gives, token for token, the argmax chain of repeated full
forwards; on one rank and on a disjoint placement (vision DP2, backbone TP2); prompts of
different lengths; seeded sampling; stopping at an end-of-sequence token."""

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

BATCH, NEW = 4, 6
ANSWER_STARTS = [24, 20, 27, 22]  # each row's first loss-masked label: prompts of start + 1 tokens


def _build(placement):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm(placement), seed=3).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    return model


def _batch(model):
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    batch = synthetic_batch(model.valid, BATCH, seed=11)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    for row, start in enumerate(ANSWER_STARTS):
        batch["loss_mask"][row, start:] = 1.0
    return batch


def _recomputed(model, batch) -> torch.Tensor:
    """The reference: each new token is the argmax of a full forward over the prompt and the
    tokens chosen so far (one rank: the whole vocabulary here)."""
    produced = {}
    with torch.no_grad():
        for name in ("vision", "proj"):
            inputs = {port: batch[key] for key, (node, port) in model.valid.inputs.items() if node == name}
            inputs.update({e.dst_port: produced[e.src][e.src_port] for e in model.valid.edges if e.dst == name})
            produced[name] = model.valid.builders[name].run(model.chunks(name)[0].eval(), inputs)
        lm, builder = model.chunks("lm")[0].eval(), model.valid.builders["lm"]
        ids, out = batch["input_ids"].clone(), torch.full((BATCH, NEW), -1)
        for k in range(NEW):
            logits = builder.run(lm, {"input_ids": ids, "image": produced["proj"]["output"]})["logits"]
            for row, start in enumerate(ANSWER_STARTS):  # position `start` predicts the first answer token
                out[row, k] = int(logits[row, start + k, :256].argmax())
                if start + 1 + k < ids.shape[1]:
                    ids[row, start + 1 + k] = out[row, k]
    return out


def _one_rank() -> dict:
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    model = _build("single")
    batch = _batch(model)
    schedule = GraphSchedule(model)
    out = dict(initial={n: {k: p.detach().clone() for k, p in unwrap(model.chunks(n)[0]).named_parameters()}
                        for n in model.valid.order},
               greedy=schedule.generate(batch, NEW), reference=_recomputed(model, batch),
               sampled=[schedule.generate(batch, NEW, temperature=1.0, seed=s) for s in (5, 5, 6)],
               top1=schedule.generate(batch, NEW, temperature=0.7, top_k=1, seed=9))
    out["stopped"] = schedule.generate(batch, NEW, eos_id=int(out["greedy"][0, 1]))
    model.close()
    return out


def _disjoint(initial):
    from parity_steps import load_initial
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    model = _build("disjoint4")
    load_initial(model, initial)
    generated = GraphSchedule(model).generate(_batch(model), NEW)
    model.close()
    return generated if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(1, _one_rank)[0]


def test_incremental_decoding_is_the_argmax_chain_of_full_forwards(one_rank):
    assert one_rank["greedy"].shape == (BATCH, NEW)
    assert torch.equal(one_rank["greedy"], one_rank["reference"]), (one_rank["greedy"], one_rank["reference"])


def test_a_disjoint_tp2_placement_generates_the_same_tokens(one_rank):
    results = run_ranks(4, _disjoint, one_rank["initial"])
    assert torch.equal(results[0], one_rank["greedy"]) and all(r is None for r in results[1:])


def test_sampling_is_seeded_and_top_1_is_greedy(one_rank):
    same, again, other = one_rank["sampled"]
    assert torch.equal(same, again) and not torch.equal(same, other)
    assert torch.equal(one_rank["top1"], one_rank["greedy"])


def test_a_row_stops_after_its_end_of_sequence_token(one_rank):
    greedy, stopped = one_rank["greedy"], one_rank["stopped"]
    eos = int(greedy[0, 1])
    for row in range(BATCH):
        hits = (greedy[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else NEW
        assert torch.equal(stopped[row, :end], greedy[row, :end]) and bool((stopped[row, end:] == -1).all())


def test_bad_generation_options_are_named():
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.runtime.generation import GenerationOptions, generate

    for options, message in ((GenerationOptions(0), "max_new_tokens: 0"),
                             (GenerationOptions(4, temperature=float("nan")), "temperature: nan"),
                             (GenerationOptions(4, top_k=0), "top_k: 0")):
        with pytest.raises(ConfigError, match=message):
            generate(None, None, options)


def test_a_pipelined_generating_node_is_refused_by_node_and_field():
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Placement
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.runtime.generation import generating_node
    from mimo_builder._internal.validation import validate_graph

    graph = vlm("single")
    graph.nodes["lm"].config["hybrid_layer_pattern"] = "M*|-M"
    graph.nodes["lm"].placement = Placement(pp=2)
    with pytest.raises(ConfigError, match="node 'lm' placement.pp: 2; it decodes on one pipeline stage"):
        generating_node(validate_graph(graph, 2))
