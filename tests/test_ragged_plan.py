"""Ragged workloads in ``plan`` and ``place``: ``--items-per-sample``, counts from samples, and what
the items do to the encoder's and its projector's FLOPs and memory (no process started)."""

from __future__ import annotations

import json

import pytest
import torch

from cli_in_process import main_in_process
from mimo_builder._internal.errors import ConfigError, DataError
from mimo_builder._internal.planning.workload import ItemCounts, Workload, from_samples

HEAVY_TAIL = "0:0.2,1:0.5,4:0.3"


@pytest.fixture(scope="module")
def vlm():
    from mimo_builder._internal.kinds.loading import load_graph

    return load_graph("graphs/vlm.yaml")


@pytest.fixture(scope="module")
def plan(vlm):
    from mimo_builder._internal.planning.plan import make_plan

    return make_plan(vlm, 4)


def _estimate(plan, specs: list[str], micro_batch_size: int = 1, microbatches: int = 2):
    from mimo_builder._internal.planning.estimate import estimate_plan
    from mimo_builder._internal.runtime.pipeline import plan_graph

    return estimate_plan(plan, plan_graph(plan.valid, microbatches), micro_batch_size,
                         workload=Workload.parse(specs))


def test_a_mean_is_samples_of_its_floor_and_ceiling_and_a_distribution_is_kept():
    half = ItemCounts.parse("k", "3.5")
    assert half.shares == ((3, 0.5), (4, 0.5)) and half.mean == 3.5 and half.largest == 4
    assert ItemCounts.parse("k", "2").shares == ((2, 1.0),)
    tail = ItemCounts.parse("k", HEAVY_TAIL)
    assert tail.shares == ((0, 0.2), (1, 0.5), (4, 0.3)) and tail.mean == pytest.approx(1.7) and tail.largest == 4
    # the longest of two samples: 0 with 0.2^2, at most 1 with 0.7^2, else 4
    assert tail.expected_longest(2) == pytest.approx(1 * (0.7**2 - 0.2**2) + 4 * (1 - 0.7**2))
    assert Workload.parse(["pixel_values = 1:1 ", "audio=0"]).counts.keys() == {"pixel_values", "audio"}


@pytest.mark.parametrize(("spec", "message"), [
    ("pixel_values", r"'pixel_values': expected KEY=SPEC"),
    ("=3", r"'=3': expected KEY=SPEC"),
    ("pixel_values=", r"'pixel_values=': expected KEY=SPEC"),
    ("pixel_values=many", r"pixel_values: the mean must be a number, got 'many'"),
    ("pixel_values=nan", r"pixel_values: the mean must be a number"),
    ("pixel_values=-1", r"pixel_values: a sample holds 0 or more items, got a mean of -1"),
    ("pixel_values=0:0.5,1:0.4", r"pixel_values: the shares sum to 0.9, not 1"),
    ("pixel_values=1.5:1", r"pixel_values: a count is a whole number of items, 0 or more, got '1.5'"),
    ("pixel_values=-1:1", r"pixel_values: a count is a whole number of items, 0 or more, got '-1'"),
    ("pixel_values=x:1", r"pixel_values: a count must be a number, got 'x'"),
    ("pixel_values=1:half", r"pixel_values: the share of count 1 must be a number, got 'half'"),
    ("pixel_values=1:-0.5,2:1.5", r"pixel_values: the share of count 1 is negative"),
    ("pixel_values=1:0.5,1:0.5", r"pixel_values: count 1 is given twice"),
    ("pixel_values=1:0.5,2", r"pixel_values: '2' is not COUNT:SHARE"),
])
def test_every_malformed_spec_is_named_with_the_flag_and_key(spec, message):
    with pytest.raises(ConfigError, match=r"--items-per-sample " + message):
        Workload.parse([spec])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"--items-per-sample pixel_values: given twice"):
        Workload.parse(["pixel_values=1", "pixel_values=2"])


@pytest.mark.parametrize(("spec", "message"), [
    ("pixels=2", r"pixels: the graph binds no batch key 'pixels'; keys bound to encoder inputs: pixel_values"),
    ("input_ids=2", r"input_ids: 'input_ids' feeds the backbone's lm.input_ids, not an encoder"),
    ("labels=1", r"labels: 'labels' feeds the backbone's lm.labels"),
])
def test_a_key_that_is_not_an_encoders_input_is_named(plan, spec, message):
    with pytest.raises(ConfigError, match=r"--items-per-sample " + message):
        Workload.parse([spec]).check(plan.valid)


def test_an_encoder_that_takes_one_item_per_sample_takes_only_one(vlm):
    """vlm without its tower: the batch feeds the projector, which lists no ragged input."""
    from mimo_builder._internal.validation import validate_graph

    graph = vlm.model_copy(deep=True)
    del graph.nodes["vision"]
    graph.edges = ["proj.output -> lm.image"]
    graph.inputs = {"features": "proj.input", **{k: v for k, v in graph.inputs.items() if k != "pixel_values"}}
    valid = validate_graph(graph)
    Workload.parse(["features=1"]).check(valid)
    with pytest.raises(ConfigError, match=r"--items-per-sample features: node 'proj' takes exactly one item per "
                                          r"sample on input"):
        Workload.parse(["features=2"]).check(valid)


def test_the_encoders_flops_scale_by_the_mean_and_its_activations_by_the_most(plan):
    one, half = _estimate(plan, []), _estimate(plan, ["pixel_values=3.5"])
    assert half.nodes["vision"].flops_per_step == one.nodes["vision"].flops_per_step * 3.5
    assert half.nodes["vision"].stages[0].activation_bytes == one.nodes["vision"].stages[0].activation_bytes * 4
    # the backbone's work does not depend on the items: its placeholders are inside seq_length
    assert half.nodes["lm"].flops_per_step == one.nodes["lm"].flops_per_step
    assert half.nodes["lm"].stages == one.nodes["lm"].stages
    # ranks 0-1 host vision and proj: their FLOPs grow, the backbone's ranks 2-3 stay
    assert half.flops[0] > one.flops[0] and half.flops[2] == one.flops[2]
    assert half.memory[0].activations > one.memory[0].activations and half.memory[2] == one.memory[2]


def test_a_projector_runs_on_its_microbatchs_longest_sample(plan):
    """proj (dp 2) takes 2 samples per microbatch at --micro-batch-size 2, each padded to the longest."""
    one, tail = _estimate(plan, [], 2), _estimate(plan, [f"pixel_values={HEAVY_TAIL}"], 2)
    assert tail.nodes["proj"].micro_batch == 2
    longest = 1 * (0.7**2 - 0.2**2) + 4 * (1 - 0.7**2)  # of two samples
    assert tail.nodes["proj"].flops_per_step == pytest.approx(one.nodes["proj"].flops_per_step * longest, rel=1e-6)
    assert tail.nodes["proj"].stages[0].activation_bytes == one.nodes["proj"].stages[0].activation_bytes * 4
    assert tail.nodes["vision"].flops_per_step == pytest.approx(one.nodes["vision"].flops_per_step * 1.7, rel=1e-6)
    assert tail.nodes["vision"].stages[0].activation_bytes == one.nodes["vision"].stages[0].activation_bytes * 4


def test_one_item_per_sample_is_the_plan_without_the_flag(plan):
    one, flagged = _estimate(plan, []), _estimate(plan, ["pixel_values=1"])
    assert [n.stages for n in one.nodes.values()] == [n.stages for n in flagged.nodes.values()]
    assert one.flops == flagged.flops and one.memory == flagged.memory


def test_no_item_at_all_leaves_the_encoder_without_flops_or_activations(plan):
    none = _estimate(plan, ["pixel_values=0"])
    assert none.nodes["vision"].flops_per_step == 0 and none.nodes["proj"].flops_per_step == 0
    assert none.nodes["vision"].stages[0].activation_bytes == 0


def _placement_table():
    """Per-row costs (a fixed part per call, so that not every shape is colocated's equal)."""
    from mimo_builder._internal.planning.cost_table import CostTable, Linear, LinkCosts, NodeCosts

    def node(per_row):
        return NodeCosts(forward=Linear(fixed=0.02, per_row=per_row), backward=Linear(fixed=0.02, per_row=2 * per_row))

    return CostTable(nodes={"vision": {1: node(0.01)}, "proj": {1: node(0.001)}, "lm": {1: node(0.01)}},
                     link=LinkCosts())


def _feeder_ranks(candidates) -> int:
    """The encoder side's ranks in the fastest placement that splits the graph ('disjoint A+B')."""
    best = next(c for c in candidates if c.label.startswith("disjoint"))
    return int(best.label.split()[1].split("+")[0].rstrip(":"))


def test_place_gives_the_encoders_more_ranks_under_a_heavy_image_workload(vlm):
    """Colocated placements give every node every rank, so the shares are compared on the best split
    placement: with half an image per sample the encoders take 2 of 4 ranks, with 8 they take 3."""
    from mimo_builder._internal.planning.place import search

    table = _placement_table()
    light, _ = search(vlm, 4, table, 24, top=100, workload=Workload.parse(["pixel_values=0.5"]))
    heavy, _ = search(vlm, 4, table, 24, top=100, workload=Workload.parse(["pixel_values=8"]))
    assert _feeder_ranks(light) == 2 and _feeder_ranks(heavy) == 3
    assert heavy[0].prediction.step > light[0].prediction.step


def test_from_samples_counts_none_one_a_list_and_a_stack(plan):
    image = torch.zeros(3, 32, 32)
    samples = [{"prompt": "text only"}, {"pixel_values": None}, {"pixel_values": image},
               {"pixel_values": [image, torch.zeros(3, 16, 24)]}, {"pixel_values": torch.zeros(3, 3, 32, 32)}]
    counted = from_samples(plan.valid, samples, "five samples")
    assert counted.counts.keys() == {"pixel_values"} and counted.source == "five samples"
    pixels = counted.counts["pixel_values"]
    assert pixels.shares == ((0, 0.4), (1, 0.2), (2, 0.2), (3, 0.2)) and pixels.mean == 1.2 and pixels.largest == 3
    with pytest.raises(DataError, match=r"sample 1\['pixel_values'\] must be an array without the batch axis"):
        from_samples(plan.valid, [{}, {"pixel_values": torch.zeros(32, 32)}])
    with pytest.raises(ConfigError, match=r"sample 0 is a str, not a dict"):
        from_samples(plan.valid, ["text"])


def test_plan_prints_the_items_and_refuses_a_bad_flag_before_building_anything():
    done = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--items-per-sample", "pixel_values=3.5")
    assert done.returncode == 0, done.stderr
    assert "vision (pixel_values): 3.5 items per sample (max 4)" in " ".join(done.stdout.split())
    bad = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--items-per-sample", "pixels=2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --items-per-sample pixels: the graph binds no")
    assert "Traceback" not in bad.stderr
    lone = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--sample-count", "8")
    assert lone.returncode == 2 and "--sample-count goes with --data REF" in lone.stderr


def test_plan_json_carries_the_workload_and_the_node_factors():
    done = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--json",
                           "--items-per-sample", f"pixel_values={HEAVY_TAIL}")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    keys = data["estimates"]["items_per_sample"]["keys"]
    assert keys["pixel_values"]["max"] == 4 and keys["pixel_values"]["mean"] == pytest.approx(1.7)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["vision"]["items"]["encoder"] and not nodes["proj"]["items"]["encoder"]
    assert nodes["lm"]["items"] is None


def test_plan_counts_the_items_of_the_datas_first_samples(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 24)).save(tmp_path / "a.png")
    records = [{"image": images, "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]}
               for images in (["a.png"], ["a.png", "a.png"], ["a.png", "a.png"], [])]
    (tmp_path / "data.json").write_text(json.dumps([{k: v for k, v in r.items() if v} for r in records]))
    done = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--data", f"llava:{tmp_path}/data.json",
                           "--sample-count", "3", "--json")
    assert done.returncode == 0, done.stderr
    counted = json.loads(done.stdout)["estimates"]["items_per_sample"]
    pixels = counted["keys"]["pixel_values"]
    assert counted["source"] == "--data: first 3 samples" and pixels["mean"] == pytest.approx(5 / 3) and pixels["max"] == 2
    over = main_in_process("plan", "graphs/vlm.yaml", "--world-size", "4", "--data", f"llava:{tmp_path}/data.json",
                           "--items-per-sample", "pixel_values=6", "--json")
    keys = json.loads(over.stdout)["estimates"]["items_per_sample"]
    assert keys["keys"]["pixel_values"]["mean"] == 6 and keys["source"] == "--data: first 4 samples, --items-per-sample"


def test_place_takes_the_flag_and_says_what_it_assumed(tmp_path):
    costs = tmp_path / "costs.json"
    _placement_table().save(costs)
    done = main_in_process("place", "graphs/vlm.yaml", "--world-size", "4", "--costs", str(costs), "--batch-size", "24",
                           "--top", "2", "--items-per-sample", "pixel_values=8")
    assert done.returncode == 0, done.stderr
    assert "items (--items-per-sample): pixel_values 8 items per sample (max 8)" in done.stdout
    bad = main_in_process("place", "graphs/vlm.yaml", "--world-size", "4", "--items-per-sample", "input_ids=2")
    assert bad.returncode == 2 and "--items-per-sample input_ids: 'input_ids' feeds the backbone" in bad.stderr
