"""Context and expert parallelism inside a node at run time: parity with cp=1 / ep=1.

CP: a projector (DP 2, ranks 0-1) feeds a hybrid backbone (Mamba, attention with RoPE, MLP) at
cp=2 on ranks 2-3, its modality embeddings at placeholders spread over both CP ranks' chunks.
EP: a backbone with MoE layers at ep=2 x expert-DP 2 (and cp=2 x DP 2) on ranks 0-3. Each is
compared, within one spawn of 4 ranks, with the same graph on rank 0 alone (cp=1 / ep=1) from the
same weights: the loss, the graph-wide grad norm and every parameter after one clipped SGD step
agree within 1e-5 (relative), with 1 and 2 microbatches. Evaluation at cp=2 gives cp=1's loss
and the same per-sample right answers. Validation names what cannot work, before any process
group exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks
from parity_steps import sgd_steps

BATCH, SEED, DATA_SEED, LR = 8, 3, 11, 0.5
HID, VOCAB = 32, 64
MICROBATCHES = (1, 2)
RTOL = 1e-5


def _lm(pattern: str, **extra):
    from submodels.mamba import MambaConfig

    return MambaConfig(num_layers=len(pattern), hidden_size=HID, num_attention_heads=4,
                       hybrid_layer_pattern=pattern, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                       seq_length=48, position_embedding_type="rope", mamba_state_dim=16, mamba_head_dim=16,
                       mamba_num_groups=2, ffn_hidden_size=48, **extra)


def _cp_graph(cp: int):
    """A projector feeding the backbone: colocated on rank 0 (cp=1) or disjoint, backbone cp=2."""
    from mimo_builder._internal.document.graph import Graph, Placement
    from submodels.projector import ProjectorConfig

    enc, lm = (Placement(size=1), Placement(size=1)) if cp == 1 else \
        (Placement(offset=0, size=2), Placement(offset=2, size=2, cp=2))
    graph = (Graph().add("enc", ProjectorConfig(input_size=8, output_size=HID, ffn_hidden_size=16), placement=enc)
             .add("lm", _lm("M*-M", modality_token_ids={"image": 1}), placement=lm)
             .connect("enc.output", "lm.image").bind("x", "enc.input"))
    for key in ("input_ids", "labels", "loss_mask"):
        graph.bind(key, f"lm.{key}")
    return graph.output("lm.loss").output("lm.correct")


def _ep_graph(ep: int):
    from mimo_builder._internal.document.graph import Graph, Placement

    # DP 2 x CP 2; the expert view splits the same 4 ranks as EP 2 x expert DP 2
    placement = Placement(size=1) if ep == 1 else Placement(offset=0, size=4, cp=2, ep=2)
    graph = Graph().add("lm", _lm("ME*E", num_experts=4, moe_router_topk=2, transformer={"add_bias_linear": False}), placement=placement)
    for key in ("input_ids", "labels", "loss_mask"):
        graph.bind(key, f"lm.{key}")
    return graph.output("lm.loss")


def _global_params(model, name):
    """``name``'s parameters on this rank, local experts under their global expert index."""
    from mimo_builder._internal.assembly.tp_shard import unwrap

    out = {}
    for chunk in model.chunks(name):
        core = unwrap(chunk)
        pgs = model.pg_collection(name)
        for key, param in core.named_parameters():
            parts = key.split(".")
            if "local_experts" in parts:
                at = parts.index("local_experts") + 1
                local = core.config.num_moe_experts // pgs.ep.size()
                parts[at] = str(pgs.ep.rank() * local + int(parts[at]))
            out[".".join(parts)] = param
    return out


def _built(graph):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder

    (model,) = CompositeBuilder(graph, seed=SEED).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model


def _steps(graph, initial):
    """One clipped SGD step per microbatch count, each from ``initial`` (None: the built weights)."""
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _built(graph)
    params = {n: _global_params(model, n) for n in model.valid.order if model.hosts(n)}
    if initial is None:
        initial = {n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()}
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.05, mcore={"sgd_momentum": 0.0})
    runs = sgd_steps(model, params, initial, synthetic_batch(model.valid, BATCH, seed=DATA_SEED), MICROBATCHES, sgd)
    model.close()
    return initial, runs


def _parity(make_graph):
    """The reference (cp=1 / ep=1, on rank 0) then the parallel graph from its weights."""
    initial, reference = _steps(make_graph(1), None)
    shared = [initial if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    _, runs = _steps(make_graph(2), shared[0])
    return dict(rank=dist.get_rank(), reference=reference if dist.get_rank() == 0 else None, runs=runs,
                initial=shared[0])


def _built_at(graph, initial):
    model = _built(graph)
    with torch.no_grad():
        for name in model.valid.order:
            if model.hosts(name):
                for key, param in _global_params(model, name).items():
                    param.copy_(initial[name][key])
    return model


def _greedy_answers_for_half(model, batch):
    """``batch`` with the labels of its first half replaced by the backbone's greedy predictions
    (those samples are right by construction), computed on one rank at cp=1. The next sample is
    right but for one token in the middle of the sequence, which at cp=2 only the second CP rank
    holds (2 * cp chunks; rank 0 holds the first and the last)."""
    builders, enc, lm = model.valid.builders, model.chunks("enc")[0], model.chunks("lm")[0]
    with torch.no_grad():
        lm.eval(), enc.eval()
        image = builders["enc"].run(enc, {"input": batch["x"]})["output"]
        logits = builders["lm"].run(lm, {"input_ids": batch["input_ids"], "image": image})["logits"]
    labels, mask, greedy = batch["labels"].clone(), batch["loss_mask"].clone(), logits.argmax(-1)
    half, middle = BATCH // 2, labels.shape[1] // 2
    labels[:half + 1] = greedy[:half + 1]
    labels[half, middle] = (greedy[half, middle] + 1) % VOCAB
    mask[half, middle] = 1.0
    return {**batch, "labels": labels, "loss_mask": mask}


def _cp_evaluation(initial):
    """``evaluate`` at cp=1 (rank 0) and at cp=2 (ranks 2-3) from the same weights and batch."""
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    reference = _built_at(_cp_graph(1), initial)
    batch = synthetic_batch(reference.valid, BATCH, seed=DATA_SEED)
    shared = [_greedy_answers_for_half(reference, batch) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    at_cp1 = GraphSchedule(reference).evaluate(shared[0])
    reference.close()
    split = _built_at(_cp_graph(2), initial)
    at_cp2 = GraphSchedule(split).evaluate(shared[0], 2)
    split.close()
    return at_cp1, at_cp2


def _both():
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    cp, ep = _parity(_cp_graph), _parity(_ep_graph)
    ep.pop("initial")
    return {"cp": cp, "ep": ep, "cp_eval": _cp_evaluation(cp.pop("initial"))}


@pytest.fixture(scope="module")
def results():
    """Both parity runs in one spawn of 4 ranks (a spawn costs more than the runs)."""
    ranks = run_ranks(4, _both)
    return {kind: [r[kind] for r in ranks] for kind in ("cp", "ep", "cp_eval")}


def _check_parity(results):
    reference = results[0]["reference"]
    seen = set()
    for m in MICROBATCHES:
        expected = reference[m]
        for r in results:
            got = r["runs"][m]
            assert got["loss"] == pytest.approx(expected["loss"], rel=RTOL), (m, r["rank"])
            assert got["norm"] == pytest.approx(expected["norm"], rel=RTOL), (m, r["rank"])
            for node, params in got["updated"].items():
                for key, value in params.items():
                    want = expected["updated"][node][key]
                    diff = float((value - want).abs().max())
                    assert diff <= RTOL * max(float(want.abs().max()), 1e-3), (m, node, key, diff)
                    seen.add((node, key))
    assert seen == {(n, k) for n, ps in reference[1]["updated"].items() for k in ps}  # every parameter


def test_backbone_with_context_parallelism_matches_cp1(results):
    _check_parity(results["cp"])


def test_evaluation_at_cp2_gives_the_loss_and_the_right_answers_of_cp1(results):
    """Half the samples' labels are the model's own greedy answers, and one more sample is wrong in
    one token that only the second CP rank holds: at cp=2 exactly that half counts as right, as at
    cp=1, and the loss matches."""
    for at_cp1, at_cp2 in results["cp_eval"]:
        assert at_cp1["lm.correct"] == 0.5 and at_cp2["lm.correct"] == 0.5, (at_cp1, at_cp2)
        assert at_cp2["lm.loss"] == pytest.approx(at_cp1["lm.loss"], rel=RTOL)


def test_backbone_with_expert_parallelism_matches_ep1(results):
    _check_parity(results["ep"])


# --- what cannot work is named before any process group exists --------------------------------

def _problems(graph, world_size: int) -> str:
    from mimo_builder._internal.errors import GraphError
    from mimo_builder._internal.validation import validate_graph

    with pytest.raises(GraphError) as err:
        validate_graph(graph, world_size)
    return str(err.value)


def _lm_only(config, **placement):
    from mimo_builder._internal.document.graph import Graph, Placement

    return Graph().add("lm", config, placement=Placement(**placement)).bind("input_ids", "lm.input_ids") \
        .bind("labels", "lm.labels").output("lm.loss")


def test_sequences_and_heads_that_cp_cannot_split_are_named():
    text = _problems(_lm_only(_lm("M*-M").model_copy(update={"seq_length": 50}), cp=2), 2)
    assert "node 'lm' placement.cp: seq_length 50 is not divisible by 2 * cp = 4" in text
    text = _problems(_lm_only(_lm("M*-M"), size=8, cp=8), 8)  # 4 Mamba heads over 8 CP ranks
    assert "node 'lm' placement.cp: Mamba heads 4 are not divisible by tp * cp = 8" in text


def test_cp_on_a_node_that_cannot_split_sequences_or_that_feeds_an_edge_is_refused():
    from mimo_builder._internal.validation import validate_graph

    graph = _cp_graph(2)
    graph.nodes["enc"].placement = graph.nodes["enc"].placement.model_copy(update={"cp": 2})
    text = _problems(graph, 4)
    assert "node 'enc' placement.cp: 2 splits sequences over context-parallel ranks, which ProjectorConfig" in text
    assert "edge 'enc.output -> lm.image': node 'enc' has placement.cp 2" in text
    assert validate_graph(_cp_graph(2), 4).layouts["lm"].cp == 2  # the backbone at cp=2 is fine


def test_experts_that_ep_cannot_split_are_named_and_the_plan_shows_ep_coordinates():
    from mimo_builder._internal.planning.plan import make_plan

    text = _problems(_lm_only(_lm("ME", num_experts=3), size=2, ep=2), 2)
    assert "node 'lm' placement.ep: num_experts 3 is not divisible by ep 2" in text
    plan = make_plan(_ep_graph(2), 4, count_params=False).as_dict()
    assert [r["nodes"]["lm"]["ep"] for r in plan["ranks"]] == [0, 1, 0, 1]  # etp=1: ep varies fastest
    assert [r["nodes"]["lm"]["cp"] for r in plan["ranks"]] == [0, 1, 0, 1]


def test_moe_layers_with_biases_are_refused_before_training_on_the_local_spec():
    from mimo_builder._internal.errors import ConfigError
    from submodels.mamba import MambaBuilder

    with pytest.raises(ConfigError, match="transformer.add_bias_linear: false"):
        MambaBuilder(_lm("ME", num_experts=2)).run_stage(None, {}, None, True, True)
