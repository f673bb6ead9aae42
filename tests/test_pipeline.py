"""Pipelined execution: the plan (no processes) and parity of pipelined placements.

Plan: a chain of S stages with M microbatches takes (M + S - 1) forward+backward slots, as 1F1B
does; a disjoint encoder warms up ahead of the backbone; in every rank's order each operation's
inputs come from operations that start earlier (what makes the order deadlock-free).

Parity: for one seed and one global batch, the loss, the graph-wide grad norm and the weights
after one SGD step equal the one-rank run (1e-5 relative) with 1, 3 and 8 microbatches, for a
backbone at pp=2, at pp=2 x vp=2, disjoint encoders (DP2) feeding a pp=2 backbone on 4 ranks,
and a diamond whose join is a pp=2 node. Weights are matched across stages by global layer
number (MCore's ``layer_number``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks
from parity_steps import global_params, sgd_steps

BATCH, SEED, DATA_SEED, LR = 48, 5, 13, 0.5
HID, VOCAB = 32, 64
MICROBATCHES = (1, 3, 8)
RTOL = 1e-5


# --- the plan ----------------------------------------------------------------------------------

def _plan(layouts, edges=(), vp=None, m=8):
    from mimo_builder._internal.runtime.pipeline import plan_pipeline

    return plan_pipeline(list(layouts), list(edges), layouts, vp or {}, set(layouts), m)


@pytest.mark.parametrize("m", MICROBATCHES)
def test_a_chain_of_stages_runs_in_1f1b_time(m):
    from mimo_builder._internal.placement import Layout

    plan = _plan({"lm": Layout(0, 4, pp=4)}, m=m)
    assert plan.makespan == (m + 4 - 1) * 3  # forward 1 + backward 2 per slot
    assert [plan.warmup(r) for r in range(4)] == [min(m, 4 - r) for r in range(4)]


def test_a_disjoint_encoder_works_ahead_of_the_backbone():
    from mimo_builder._internal.placement import Layout

    plan = _plan({"enc": Layout(0, 2), "lm": Layout(2, 2, pp=2)}, [("enc", "lm")])
    assert plan.makespan == (8 + 3 - 1) * 3
    assert [plan.warmup(r) for r in range(4)] == [3, 3, 2, 1]
    assert max(plan.idle_fraction(r) for r in range(4)) < 0.25  # a sequential run idles ~2/3


@pytest.mark.parametrize("layouts, edges, vp", [
    ({"a": (0, 2, 1), "b": (0, 4, 2), "c": (2, 2, 1), "d": (2, 2, 2)}, [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], {}),
    ({"enc": (0, 1, 1), "lm": (0, 2, 2)}, [("enc", "lm")], {"lm": 2}),
    ({"x": (0, 3, 3), "y": (1, 2, 1)}, [("x", "y")], {"x": 2}),
])
def test_every_input_is_produced_before_it_is_needed(layouts, edges, vp):
    from mimo_builder._internal.placement import Layout
    from mimo_builder._internal.runtime.pipeline import BACKWARD, COST, FORWARD

    plan = _plan({n: Layout(o, s, pp=p) for n, (o, s, p) in layouts.items()}, edges, vp, m=3)
    start = {(op.kind, op.stage, op.microbatch): op.start for ops in plan.order.values() for op in ops}
    assert len(start) == 2 * 3 * len(plan.stages)
    for (kind, stage, m), t in start.items():
        deps = [(FORWARD, p, m) for p in plan.preds[stage]] if kind == FORWARD else \
            [(FORWARD, stage, m), *((BACKWARD, q, m) for q in plan.succs[stage])]
        assert all(start[d] + COST[d[0]] <= t for d in deps), (kind, stage, m)
    for ops in plan.order.values():
        assert all(a.start + COST[a.kind] <= b.start for a, b in zip(ops, ops[1:]))


# --- parity ------------------------------------------------------------------------------------

def _lm(pattern="M*-M", **modalities):
    from submodels.mamba import MambaConfig

    transformer = {"virtual_pipeline_model_parallel_size": 2} if pattern.count("|") == 3 else {}
    return MambaConfig(num_layers=4, hidden_size=HID, num_attention_heads=4, hybrid_layer_pattern=pattern,
                       vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_length=64,
                       position_embedding_type="rope", mamba_state_dim=16, mamba_head_dim=16,
                       mamba_num_groups=2, modality_token_ids=modalities, transformer=transformer)


def _proj(input_size):
    from submodels.projector import ProjectorConfig

    return ProjectorConfig(input_size=input_size, output_size=HID, ffn_hidden_size=16)


def _graph(kind: str, placed: bool):
    from mimo_builder._internal.document.graph import Graph, Placement

    at = (lambda **p: Placement(**p)) if placed else (lambda **p: Placement())
    text = dict(input_ids="lm.input_ids", labels="lm.labels", loss_mask="lm.loss_mask")
    if kind in ("pp2", "vp2"):
        pattern = "M|*|-|M" if kind == "vp2" and placed else "M*-M"
        graph = Graph().add("lm", _lm(pattern), placement=at(pp=2))
    elif kind == "encoders":
        graph = (Graph().add("enc", _proj(8), placement=at(offset=0, size=2))
                 .add("lm", _lm(image=1), placement=at(offset=2, size=2, pp=2))
                 .connect("enc.output", "lm.image").bind("x", "enc.input"))
    else:  # diamond: root -> left, right -> lm (pp=2)
        graph = (Graph().add("root", _proj(8), placement=at(offset=0, size=2))
                 .add("left", _proj(HID), placement=at(offset=0, size=2))
                 .add("right", _proj(HID), placement=at(offset=2, size=2))
                 .add("lm", _lm(image=1, audio=2), placement=at(offset=2, size=2, pp=2))
                 .connect("root.output", "left.input").connect("root.output", "right.input")
                 .connect("left.output", "lm.image").connect("right.output", "lm.audio")
                 .bind("x", "root.input"))
    for key, port in text.items():
        graph.bind(key, port)
    return graph.output("lm.loss")


def _steps(kind: str, placed: bool, initial=None):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(kind, placed), seed=SEED).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    params = {n: global_params(model, n) for n in model.valid.order if model.hosts(n)}
    if initial is None:
        initial = {n: {k: p.detach().clone() for k, p in ps.items()} for n, ps in params.items()}
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.5, mcore={"sgd_momentum": 0.0})
    runs = sgd_steps(model, params, initial, synthetic_batch(model.valid, BATCH, seed=DATA_SEED), MICROBATCHES, sgd)
    return dict(initial=initial, runs=runs, rank=dist.get_rank())


def _references():
    return {kind: _steps(kind, False) for kind in ("pp2", "encoders", "diamond")}


@pytest.fixture(scope="module")
def references():
    return run_ranks(1, _references)[0]  # one process: a spawn costs more than the three runs


def _placed(kinds, initials):
    return {kind: _steps(kind, True, initials[kind]) for kind in kinds}


@pytest.fixture(scope="module")
def placed(references):
    """Every placed run, two graphs per spawn (a spawn costs more than a run)."""
    initial = {kind: references[_reference_of(kind)]["initial"] for kind in ("pp2", "vp2", "encoders", "diamond")}
    out = {}
    for nproc, kinds in ((2, ("pp2", "vp2")), (4, ("encoders", "diamond"))):
        ranks = run_ranks(nproc, _placed, kinds, initial)
        out.update({kind: [r[kind] for r in ranks] for kind in kinds})
    return out


def _reference_of(kind: str) -> str:
    return "pp2" if kind == "vp2" else kind  # vp2 is pp2's model with its layers split in four stages


@pytest.mark.parametrize("kind", ["pp2", "vp2", "encoders", "diamond"])
def test_pipelined_placements_match_the_single_rank_run(references, placed, kind):
    ref = references[_reference_of(kind)]
    results = placed[kind]
    for m in MICROBATCHES:
        expected = ref["runs"][m]
        for r in results:
            got = r["runs"][m]
            assert got["loss"] == pytest.approx(expected["loss"], rel=RTOL), (kind, m, r["rank"])
            assert got["norm"] == pytest.approx(expected["norm"], rel=RTOL), (kind, m, r["rank"])
        seen = set()
        for r in results:
            for node, params in r["runs"][m]["updated"].items():
                for key, value in params.items():
                    want = expected["updated"][node][key]
                    diff = float((value - want).abs().max())
                    assert diff <= RTOL * max(float(want.abs().max()), 1e-3), (kind, m, node, key, diff)
                    seen.add((node, key))
        assert seen == {(n, k) for n, ps in expected["updated"].items() for k in ps}, kind  # all covered
    moved = ref["runs"][3]["updated"]["lm"]
    assert any(not torch.equal(ref["initial"]["lm"][k], v) for k, v in moved.items())


def test_virtual_stages_without_pipeline_ranks_are_refused_by_node_and_field():
    from mimo_builder._internal.errors import GraphError
    from mimo_builder._internal.validation import validate_graph

    graph = _graph("vp2", placed=False)
    graph.nodes["lm"].config["hybrid_layer_pattern"] = "M*|-M"
    graph.nodes["lm"].config["transformer"] = {"virtual_pipeline_model_parallel_size": 2}
    with pytest.raises(GraphError, match=r"node 'lm' placement.pp: .*virtual_pipeline_model_parallel_size=2 needs pp > 1"):
        validate_graph(graph, 2)
