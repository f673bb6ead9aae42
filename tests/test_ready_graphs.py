"""The shipped graphs: YAML twins, validation and plans for every placement, builds on gloo."""

import pathlib

import pytest
import torch.distributed as dist

from mimo_builder._internal.errors import GraphError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.planning.plan import make_plan
from mimo_builder._internal.validation import validate_graph
from multirank import run_ranks

GRAPHS = pathlib.Path(__file__).resolve().parents[1] / "graphs"


def _graph_module(name):
    import importlib

    return importlib.import_module(f"graphs.{name}")


@pytest.mark.parametrize("name", ["mamba_lm", "vlm", "avlm", "llava", "omni"])
def test_yaml_twin_equals_python_graph(name):
    assert Graph.from_yaml((GRAPHS / f"{name}.yaml").read_text()) == _graph_module(name).graph


@pytest.mark.parametrize("name", ["vlm", "avlm"])
def test_every_placement_validates_and_plans(name):
    module = _graph_module(name)
    assert {world for world, _ in module.PLACEMENTS.values()} == {1, 2, 4}
    for placement, (world, _) in module.PLACEMENTS.items():
        graph = getattr(module, name)(placement)
        plan = make_plan(graph, world)
        assert all(plan.hosted(rank) for rank in range(world)), placement  # no idle rank
        assert all(plan.rank_params(rank) > 0 for rank in range(world))
        by_name = {n.name: n for n in plan.nodes}
        assert by_name["lm"].params == make_plan(getattr(module, name)("single"), 1).nodes[-1].params


@pytest.mark.parametrize("pp", [2, 4])
def test_a_tied_embedding_is_counted_once_across_pipeline_stages(pp):
    from graphs.mamba_lm import mamba_lm

    def plan(pp):
        graph = mamba_lm()
        graph.nodes["lm"].config.update(share_embeddings_and_output_weights=True, num_layers=4)
        graph.nodes["lm"].placement.pp = pp
        return make_plan(graph, pp).nodes[0]

    single, staged = plan(1), plan(pp)
    config = mamba_lm().nodes["lm"].config
    embedding = config["vocab_size"] * config["hidden_size"]
    assert staged.params == single.params
    assert sum(staged.stage_params) == single.params + embedding  # the last stage holds its copy


def test_disjoint_placement_puts_encoders_on_0_1_and_backbone_tp2_on_2_3():
    from graphs.avlm import avlm

    plan = make_plan(avlm("disjoint4"), 4)
    assert [n.name for n, _ in plan.hosted(0)] == ["vision", "vision_proj", "audio", "audio_proj"]
    assert [(n.name, c["tp"]) for n, c in plan.hosted(3)] == [("lm", 1)]
    assert {n.name: n.layout.dp for n in plan.nodes} == {
        "vision": 2, "vision_proj": 2, "audio": 2, "audio_proj": 2, "lm": 1}


def test_mismatched_dimensions_are_rejected_naming_the_edge():
    from graphs.avlm import avlm

    graph = avlm()
    graph.nodes["audio_proj"].config["input_size"] = 48
    graph.nodes["vision_proj"].config["output_size"] = 32
    with pytest.raises(GraphError) as err:
        validate_graph(graph, 4)
    text = str(err.value)
    assert "edge 'audio.embeddings -> audio_proj.input': audio.embeddings has 64 features" in text
    assert "edge 'vision_proj.output -> lm.image': vision_proj.output has 32 features" in text


def _build(name, placement):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    graph = getattr(_graph_module(name), name)(placement)
    (composite,) = CompositeBuilder(graph).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return sorted(composite.nodes), sum(p.numel() for p in composite.parameters()), dist.get_rank()


def test_avlm_builds_disjoint_on_four_gloo_ranks():
    results = run_ranks(4, _build, "avlm", "disjoint4")
    plan = make_plan(_graph_module("avlm").avlm("disjoint4"), 4)
    for hosted, params, rank in results:
        assert hosted == sorted(n.name for n, _ in plan.hosted(rank))
        assert params == plan.rank_params(rank)  # the dry run predicted the real build


def test_vlm_builds_colocated_tp2_on_two_gloo_ranks():
    results = run_ranks(2, _build, "vlm", "colocated_tp2")
    plan = make_plan(_graph_module("vlm").vlm("colocated_tp2"), 2)
    for hosted, params, rank in results:
        assert hosted == ["lm", "proj", "vision"] and params == plan.rank_params(rank)
