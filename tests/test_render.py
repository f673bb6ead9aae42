"""Pictures of a graph and its placement (``mimo-builder render``): every format is produced and
well formed (DOT read back by pydot, SVG by an XML parser, PNG by Pillow), the CLI refuses bad
requests with one line, and a 1,024-rank placement stays quick and readable."""

import ast
import io
import math
import os
import pathlib
import pty
import re
import time
import xml.etree.ElementTree as ET

import pydot
import pytest
import yaml
from PIL import Image

from mimo_builder.cli import main
from mimo_builder._internal.document.graph import Graph, parse_edge
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.render import render
from mimo_builder._internal.render.scene import PALETTE, NodeView, Scene, rank_columns, smallest_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ("vlm", "avlm", "mamba_lm")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _graph(name: str) -> Graph:
    return Graph.from_yaml((ROOT / "graphs" / f"{name}.yaml").read_text())


def _vlm_with(**placements) -> Graph:
    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    for node, placement in placements.items():
        doc["nodes"][node]["placement"] = placement
    return Graph.from_dict(doc)


def _document_edges(graph: Graph):
    return [parse_edge(text) for text in graph.edges]


def _dot_nodes(dot) -> dict[str, pydot.Node]:
    """Every node statement of a parsed DOT graph, clusters included, without default statements."""
    found = {n.get_name().strip('"'): n for n in dot.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
    for sub in dot.get_subgraphs():
        found.update(_dot_nodes(sub))
    return found


@pytest.mark.parametrize("name", SHIPPED)
def test_dot_has_every_node_and_every_edge_with_its_ports(name):
    graph = _graph(name)
    (dot,) = pydot.graph_from_dot_data(render(graph, "dot"))
    assert set(_dot_nodes(dot)) == set(graph.nodes)
    edges = [(e.get_source().strip('"'), e.get_destination().strip('"'), e.get_label()) for e in dot.get_edges()]
    assert len(edges) == len(graph.edges)
    for ((src, sport), (dst, dport)), (got_src, got_dst, label) in zip(_document_edges(graph), edges):
        assert (got_src, got_dst) == (src, dst) and f"{sport} → {dport}" in label


def test_dot_shows_layouts_feature_sizes_and_colocation():
    (dot,) = pydot.graph_from_dot_data(render(_graph("vlm"), "dot"))
    nodes = _dot_nodes(dot)
    lm = nodes["lm"].get_label()
    assert "ranks 2-3" in lm and "tp2" in lm  # vlm.yaml: offset 2, size 2, tp 2
    assert "dp2" in nodes["vision"].get_label()  # 2 ranks, no model parallelism
    assert "× 64)" in dot.get_edges()[1].get_label()  # proj output_size: 64
    (cluster,) = dot.get_subgraphs()  # vision and proj share ranks 0-1; lm stands alone
    assert {n.get_name().strip('"') for n in cluster.get_nodes()} == {"vision", "proj"}


def test_keywords_as_node_names_stay_well_formed():
    """'graph', 'node' and 'end' are valid node names and keywords of DOT and Mermaid."""
    projector = {"builder": "projector", "input_size": 8, "output_size": 8}
    graph = (Graph().add("graph", projector).add("node", projector).add("end", projector)
             .connect("graph.output", "node.input").connect("node.output", "end.input")
             .bind("x", "graph.input").output("end.output"))
    (dot,) = pydot.graph_from_dot_data(render(graph, "dot", world_size=2))
    assert set(_dot_nodes(dot)) == {"graph", "node", "end"} and len(dot.get_edges()) == 2
    mermaid = render(graph, "mermaid", world_size=2)
    assert "n_graph -->" in mermaid and '| n_end' in mermaid
    assert sum(line.strip() == "end" for line in mermaid.splitlines()) == mermaid.count("subgraph ")


@pytest.mark.parametrize("name", SHIPPED)
def test_mermaid_is_a_flowchart_with_every_edge(name):
    graph = _graph(name)
    text = render(graph, "mermaid")
    assert text.startswith("flowchart LR\n")
    for node in graph.nodes:
        assert sum(line.strip().startswith(f'n_{node}["') for line in text.splitlines()) == 1
    for (src, sport), (dst, dport) in _document_edges(graph):
        assert f'n_{src} -->|"{sport} → {dport}' in text and f'| n_{dst}\n' in text


@pytest.mark.parametrize("name", SHIPPED)
def test_svg_is_xml_with_node_names_and_ports_as_text(name):
    graph = _graph(name)
    root = ET.fromstring(render(graph, "svg"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for node in graph.nodes:
        assert node in texts.split()
    for (_, sport), (_, dport) in _document_edges(graph):
        assert f"{sport} → {dport}" in texts


def test_an_edge_that_skips_a_layer_is_drawn_with_its_label():
    """audio feeds lm directly, past the layer of vision_proj: its arrow runs through a waypoint."""
    doc = yaml.safe_load((ROOT / "graphs/avlm.yaml").read_text())
    del doc["nodes"]["audio_proj"]
    doc["edges"] = [e for e in doc["edges"] if "audio_proj" not in e] + ["audio.embeddings -> lm.audio"]
    root = ET.fromstring(render(Graph.from_dict(doc), "svg", view="graph"))
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    frames = doc["nodes"]["audio"]["config"]["max_frames"]  # the stride-2 conv halves them
    assert f"embeddings → audio ({math.ceil(frames / 2)} tokens × 64)" in texts and texts.count("lm") == 1


def _unused_port(graph: Graph, node: str, port: str) -> str:
    """``port`` of ``node``, checked to be neither fed by an edge nor bound to the batch."""
    assert not any(f"{node}.{port}" in text for text in [*graph.edges, *graph.inputs.values()])
    return port


@pytest.mark.parametrize("name", ["vlm", "avlm"])
def test_boxes_list_every_port_even_an_unconnected_one(name):
    """The backbone's optional position_ids is fed by nothing, and its logits read by nothing."""
    graph = _graph(name)
    position_ids, logits = _unused_port(graph, "lm", "position_ids"), "logits"
    (dot,) = pydot.graph_from_dot_data(render(graph, "dot"))
    lm = _dot_nodes(dot)["lm"].get_label()
    assert re.search(rf"\\nin: [^\\\\]*\b{position_ids}\b", lm) and re.search(rf"\\nout: [^\\\\]*\b{logits}\b", lm)
    assert "in: pixel_values" in _dot_nodes(dot)["vision"].get_label()
    (mermaid_lm,) = [line for line in render(graph, "mermaid").splitlines() if line.strip().startswith('n_lm["')]
    assert f"<br/>in: input_ids, {position_ids}," in mermaid_lm and f"<br/>out: {logits}," in mermaid_lm
    texts = [t.text or "" for t in ET.fromstring(render(graph, "svg", view="graph")).iter(f"{SVG}text")]
    assert any(t.startswith("in: ") and position_ids in t for t in texts)


def _vlm_tokens(doc) -> int:
    """Tokens per image by hand: (image_size / patch_size)^2 patches, plus the class token
    (VisionConfig's default: on), divided by the projector's token_reduction (default 1)."""
    vision, proj = doc["nodes"]["vision"]["config"], doc["nodes"]["proj"]["config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return (patches + int(vision.get("class_token", True))) // proj.get("token_reduction", 1)


@pytest.mark.parametrize("changes", [{}, {"vision": {"class_token": False}, "proj": {"token_reduction": 4}}])
def test_edge_labels_carry_the_tokens_per_sample(changes):
    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    for node, config in changes.items():
        doc["nodes"][node]["config"].update(config)
    vision = doc["nodes"]["vision"]["config"]
    encoded = (vision["image_size"] // vision["patch_size"]) ** 2 + int(vision.get("class_token", True))
    projected = _vlm_tokens(doc)
    assert (encoded, projected) == ((17, 17) if not changes else (16, 4))  # 32 / 8 = 4 patches a side
    graph = Graph.from_dict(doc)
    (dot,) = pydot.graph_from_dot_data(render(graph, "dot"))
    labels = [e.get_label().strip('"') for e in dot.get_edges()]
    assert labels == [f"embeddings → input ({encoded} tokens × 64)", f"output → image ({projected} tokens × 64)"]
    assert f'n_proj -->|"output → image ({projected} tokens × 64)"| n_lm' in render(graph, "mermaid")


SVG = "{http://www.w3.org/2000/svg}"


def _frame_and_names(svg: bytes, frame_id: str):
    """The bounding box of the dashed path with id ``frame_id``, where each bold (node name) text
    sits, and every text."""
    root = ET.fromstring(svg)
    (group,) = [g for g in root.iter(f"{SVG}g") if g.get("id") == frame_id]
    path = group.find(f"{SVG}path")
    assert "stroke-dasharray" in path.get("style")
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.get("d"))]
    xs, ys = numbers[0::2], numbers[1::2]
    names = {t.text: (float(t.get("x")), float(t.get("y"))) for t in root.iter(f"{SVG}text")
             if "font-weight: 700" in (t.get("style") or "")}
    texts = [t.text for t in root.iter(f"{SVG}text")]
    return (min(xs), min(ys), max(xs), max(ys)), names, texts


def test_svg_frames_colocated_nodes_with_their_ranks():
    """vlm: vision and proj share ranks 0-1 (one dashed frame, labelled as DOT's cluster), lm is outside."""
    svg = render(_graph("vlm"), "svg", view="graph")
    (left, low, right, high), names, texts = _frame_and_names(svg, "colocated_0")
    inside = {n for n, (x, y) in names.items() if left < x < right and low < y < high}
    assert inside == {"vision", "proj"} and "lm" in names
    assert "ranks 0-1: colocated" in texts
    apart = render(_vlm_with(proj={"offset": 2, "size": 2}, lm={"offset": 4, "size": 2, "tp": 2}), "svg", view="graph")
    assert b'id="colocated_' not in apart and b"colocated" not in apart


def test_a_frame_that_would_cover_another_node_is_drawn_per_layer():
    """vision and lm share ranks 0-1 with proj between them on 2-3: two frames, proj in neither."""
    graph = _vlm_with(proj={"offset": 2, "size": 2}, lm={"offset": 0, "size": 2, "tp": 2})
    svg = render(graph, "svg", view="graph")
    for piece, member in (("colocated_0_0", "vision"), ("colocated_0_1", "lm")):
        (left, low, right, high), names, texts = _frame_and_names(svg, piece)
        assert {n for n, (x, y) in names.items() if left < x < right and low < y < high} == {member}
    assert texts.count("ranks 0-1: colocated") == 2


def test_svg_is_the_same_bytes_each_time():
    graph = _graph("avlm")
    assert render(graph, "svg") == render(graph, "svg")


@pytest.mark.parametrize("view", ["graph", "placement", "both"])
def test_png_is_a_picture_of_sensible_size(view):
    data = render(_graph("avlm"), "png", view=view)
    assert data.startswith(PNG_SIGNATURE)
    width, height = Image.open(io.BytesIO(data)).size
    assert 600 < width < 4000 and 150 < height < 3000, (width, height)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_yaml_and_json_round_trip_to_the_same_graph(name, fmt):
    graph = _graph(name)
    text = render(graph, fmt)
    assert (Graph.from_yaml(text) if fmt == "yaml" else Graph.from_json(text)) == graph


def test_a_large_world_merges_ranks_into_few_columns_quickly():
    """1,024 ranks: vision on 0-63, proj on 64-127, lm on all of them in two pipeline stages."""
    graph = _vlm_with(vision={"size": 64}, proj={"offset": 64, "size": 64},
                      lm={"offset": 0, "size": 1024, "tp": 2, "pp": 2})
    start = time.perf_counter()
    svg = render(graph, "svg", world_size=1024)
    assert time.perf_counter() - start < 15  # about 1 s here once matplotlib is imported
    texts = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    headers = [t for t in texts if t and t[0].isdigit() and "-" in t]
    assert headers == ["0-63", "64-127", "128-511", "512-1023"]  # lm's stage 1 starts at rank 512
    assert len(svg) < 100_000


def test_columns_fall_back_to_node_sets_when_stages_are_too_many():
    scene = Scene([NodeView("lm", "mamba", Layout(0, 1024, pp=64), False, *PALETTE[0]),
                   NodeView("enc", "vision", Layout(0, 32), False, *PALETTE[1])], [], 1024, "test")
    columns = rank_columns(scene)  # 64 stages of 16 ranks: more than 32 columns by stage
    assert [(c.first, c.last) for c in columns] == [(0, 31), (32, 1023)]
    assert columns[0].cells["lm"]["pp"] == "0-1" and columns[1].cells["lm"]["pp"] == "2-63"
    assert columns[0].cells["enc"]["dp"] == "0-31" and "enc" not in columns[1].cells


def test_small_worlds_have_a_column_per_rank_with_its_coordinates():
    scene = Scene([NodeView("lm", "mamba", Layout(2, 4, tp=2), False, *PALETTE[0])], [], 6, "test")
    columns = rank_columns(scene)
    assert len(columns) == 6 and columns[0].cells == {}
    assert columns[5].cells == {"lm": {"tp": "1", "dp": "1", "pp": "0"}}  # rank 5 = offset 2 + tp 1 + 2 * dp 1


def test_the_smallest_world_is_what_the_placements_need():
    assert smallest_world(_graph("vlm"))[0] == 4  # lm: offset 2, size 2
    assert smallest_world(_graph("mamba_lm"))[0] == 1  # one node on every rank
    assert smallest_world(_vlm_with(lm={"offset": 3, "tp": 2}))[0] == 5  # 2 ranks from rank 3


def test_no_world_fits_open_ended_placements_that_disagree(capsys, tmp_path):
    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    doc["nodes"]["vision"]["placement"] = {"tp": 2}  # an even number of ranks from 0
    doc["nodes"]["lm"]["placement"] = {"offset": 1, "tp": 2}  # an even number from 1
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(doc))
    err = _refused(capsys, "render", str(path), "--format", "dot")
    assert "'vision'" in err and "'lm'" in err and "--world-size" in err


def _refused(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["--format", "svgg"], "did you mean 'svg'"),
    (["--format", "svg", "--json"], "--json is --format json"),
    (["--format", "svg", "-o", "picture.png"], ".png file but the format is svg"),
    (["-o", "picture.txt"], "cannot tell the format"),
    (["--world-size", "4"], "--world-size applies to pictures"),
    (["--format", "dot", "--view", "placement"], "--view applies to svg and png"),
    (["--format", "png", "--view", "grid"], "unknown --view 'grid'"),
])
def test_bad_requests_exit_2_with_one_line(capsys, argv, expected):
    assert expected in _refused(capsys, "render", "graphs/vlm.yaml", *argv)


def test_unwritable_outputs_exit_2_with_one_line(capsys, tmp_path):
    assert "does not exist" in _refused(capsys, "render", "graphs/vlm.yaml", "-o", str(tmp_path / "no/x.svg"))
    assert "is a folder" in _refused(capsys, "render", "graphs/vlm.yaml", "--format", "svg", "-o", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "does not exist" in _refused(capsys, "render", "graphs/vlm.yaml", "-o", str(blocker / "x.png"))


def test_output_file_takes_its_format_from_the_suffix(capsys, tmp_path):
    out = tmp_path / "vlm.png"
    assert main(["render", "graphs/vlm.yaml", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert f"wrote {out}" in capsys.readouterr().err


def test_json_flag_is_format_json(capsys):
    assert main(["render", "graphs/vlm.yaml", "--json"]) == 0
    flag = capsys.readouterr().out
    assert main(["render", "graphs/vlm.yaml", "--format", "json"]) == 0
    assert capsys.readouterr().out == flag and Graph.from_json(flag) == _graph("vlm")


def test_pictures_go_to_a_piped_stdout(capsysbinary):
    assert main(["render", "graphs/vlm.yaml", "--format", "png"]) == 0
    assert capsysbinary.readouterr().out.startswith(PNG_SIGNATURE)


def test_pictures_are_refused_on_a_terminal(capsys, monkeypatch):
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr("sys.stdout", terminal)
        code = main(["render", "graphs/vlm.yaml", "--format", "svg"])
    os.close(leader)
    err = capsys.readouterr().err
    assert code == 2 and "-o FILE.svg" in err and err.count("\n") == 1


def test_matplotlib_is_imported_only_inside_functions():
    """``import mimo_builder._internal.render`` (and every module of it) stays fast: matplotlib loads
    only when an svg or png is drawn."""
    for path in (ROOT / "mimo_builder").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "matplotlib" for n in names), path
