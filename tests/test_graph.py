"""The graph document and its validation: no process group or module is created here."""

import pathlib

import pytest

from mimo_builder._internal.errors import ConfigError, GraphError
from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.validation import validate_graph
from submodels.mamba import MambaConfig
from submodels.projector import ProjectorConfig
from submodels.vision import VisionConfig

GRAPHS = pathlib.Path(__file__).resolve().parents[1] / "graphs"


def _vision(**kw):
    return VisionConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4, image_size=16,
                                  patch_size=4), **kw})


def _backbone(**kw):
    return MambaConfig(**{**dict(num_layers=4, hidden_size=64, num_attention_heads=4, hybrid_layer_pattern="M*-M",
                                 vocab_size=128, seq_length=64, mamba_state_dim=16, mamba_head_dim=16,
                                 mamba_num_groups=2, modality_token_ids={"image": 3}), **kw})


def _vlm(proj_in=32, proj_out=64, vision_place=None, lm_place=None) -> Graph:
    return (Graph()
            .add("vision", _vision(), placement=vision_place)
            .add("proj", ProjectorConfig(input_size=proj_in, output_size=proj_out))
            .add("lm", _backbone(), placement=lm_place)
            .connect("vision.embeddings", "proj.input")
            .connect("proj.output", "lm.image")
            .bind("pixel_values", "vision.pixel_values")
            .bind("input_ids", "lm.input_ids")
            .output("lm.loss"))


def _problems(graph, world_size=None):
    with pytest.raises(GraphError) as err:
        validate_graph(graph, world_size)
    return err.value.problems


def test_python_and_yaml_declare_the_same_document():
    graph = _vlm()
    assert Graph.from_yaml(graph.to_yaml()) == graph
    assert Graph.from_json(graph.to_json()) == graph


def test_shipped_yaml_twin_equals_the_python_graph():
    from graphs.mamba_lm import graph

    assert Graph.from_yaml((GRAPHS / "mamba_lm.yaml").read_text()) == graph


def test_valid_graph_is_resolved_in_topological_order():
    valid = validate_graph(_vlm(), world_size=4)
    assert valid.order == ["vision", "proj", "lm"]
    assert [str(e) for e in valid.edges] == ["vision.embeddings -> proj.input", "proj.output -> lm.image"]
    assert valid.layouts["lm"].size == 4 and valid.layouts["lm"].dp == 4


def test_unknown_document_keys_are_refused_with_suggestions():
    with pytest.raises(ConfigError, match="'edgez'.*did you mean 'edges'"):
        Graph.from_dict({"nodes": {}, "edgez": []})
    with pytest.raises(ConfigError, match="'placment'"):
        Graph.from_dict({"nodes": {"a": {"builder": "mamba", "placment": {}}}})


def test_port_feature_sizes_are_checked_across_edges():
    problems = _problems(_vlm(proj_in=48))
    assert any("edge 'vision.embeddings -> proj.input'" in p and "32 features" in p and "expects 48" in p
               for p in problems)


def test_unknown_nodes_and_ports_name_the_edge_and_the_alternatives():
    graph = _vlm().connect("vision.embedding", "lm.image2").connect("ghost.out", "lm.input_ids")
    problems = _problems(graph)
    assert any("no output port 'embedding'" in p and "embeddings" in p for p in problems)
    assert any("no input port 'image2'" in p for p in problems)
    assert any("unknown node 'ghost'" in p for p in problems)


def test_cycles_are_shown():
    graph = (Graph().add("a", ProjectorConfig(input_size=8, output_size=8))
             .add("b", ProjectorConfig(input_size=8, output_size=8))
             .connect("a.output", "b.input").connect("b.output", "a.input"))
    assert any("cycle a -> b -> a" in p or "cycle b -> a -> b" in p for p in _problems(graph))


def test_unbound_required_inputs_are_reported():
    graph = Graph().add("lm", _backbone())
    assert any("required input port 'input_ids' is unbound" in p for p in _problems(graph))


def test_placement_arithmetic_and_world_size():
    graph = _vlm(vision_place=Placement(offset=0, size=3, tp=2), lm_place=Placement(offset=2, size=4))
    problems = _problems(graph, world_size=4)
    assert any("node 'vision' placement: size 3 is not divisible by tp*cp*pp" in p for p in problems)
    assert any("node 'lm' placement: ranks 2..5 go beyond the world size 4" in p for p in problems)


def test_tp_must_divide_heads():
    graph = _vlm(lm_place=Placement(tp=8))
    problems = _problems(graph, world_size=8)
    assert any("node 'lm' placement.tp: num_attention_heads 4 is not divisible by tp 8" in p for p in problems)


def test_dp_sizes_across_an_edge_must_divide_each_other():
    graph = _vlm(vision_place=Placement(offset=0, size=3), lm_place=Placement(offset=3, size=2))
    problems = _problems(graph, world_size=5)
    # proj has no placement: all 5 ranks, DP 5
    assert any("'vision.embeddings -> proj.input': data-parallel sizes 3 (vision) and 5 (proj)" in p for p in problems)
    assert any("'proj.output -> lm.image': data-parallel sizes 5 (proj) and 2 (lm)" in p for p in problems)


def test_unknown_ddp_keys_and_builders_are_reported_together():
    graph = _vlm()
    graph.nodes["lm"].ddp = {"overlap_grad_reduse": True}
    graph.nodes["proj"].builder = "projektor"
    problems = _problems(graph)
    assert any("node 'lm' ddp: unknown DistributedDataParallelConfig option 'overlap_grad_reduse'" in p
               and "'overlap_grad_reduce'" in p for p in problems)
    assert any("unknown builder 'projektor'" in p for p in problems)


def test_bad_node_names_are_reported():
    graph = Graph().add("my.node", _backbone()).bind("input_ids", "my.node.input_ids")
    assert any("node name 'my.node' must be an identifier" in p for p in _problems(graph))


def test_all_problems_are_collected_in_one_error():
    graph = _vlm(proj_in=48, lm_place=Placement(tp=8))
    graph.nodes["lm"].ddp = {"bogus": 1}
    assert len(_problems(graph, world_size=8)) >= 3


def test_a_world_size_is_optional_for_validation():
    assert validate_graph(_vlm()).layouts == {}


# --- Graph.colocated ---------------------------------------------------------------------------

@pytest.mark.parametrize("declared, world, expected", [
    (dict(tp=2), 1, dict(tp=1)),  # larger than the world: shrinks
    (dict(tp=4, pp=2), 4, dict(tp=4, pp=1)),  # tp takes the ranks; pp gets what is left
    (dict(tp=2, pp=2), 8, dict(tp=2, pp=2)),  # divides: kept
    (dict(tp=2, ep=4), 4, dict(tp=2, ep=2)),  # experts split the ranks left by pp, after etp (= tp)
    (dict(tp=1, ep=2, etp=2), 4, dict(tp=1, ep=2, etp=2)),
])
def test_colocated_placements_span_the_world(declared, world, expected):
    from mimo_builder._internal.document.graph import Placement

    placed = Placement(offset=3, size=2, **declared).colocated(world, "n")
    assert (placed.offset, placed.size) == (0, None)
    assert {k: getattr(placed, k) for k in expected} == expected


@pytest.mark.parametrize("declared, field", [(dict(tp=2), "tp"), (dict(pp=2), "pp"), (dict(ep=2), "ep")])
def test_a_size_that_does_not_divide_the_world_is_named(declared, field):
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.document.graph import Placement

    with pytest.raises(ConfigError, match=rf"node 'n' placement\.{field}: 2 does not divide the 3 ranks"):
        Placement(**declared).colocated(3, "n")
