"""Measured costs: the cost table, the step predicted from it, the placement search and the
profile/plan --costs/place commands."""

import json

import pytest

from cli_in_process import main_in_process

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.planning.cost_table import CostTable, Linear, LinkCosts, NodeCosts


def _table(forward=0.02, backward=0.04, tps=(1, 2), names=("vision", "vision_proj", "audio", "audio_proj", "lm"),
           latency=0.0, per_op=0.0) -> CostTable:
    """Costs that do not depend on rows (like sleep nodes): forward and backward in seconds."""
    node = NodeCosts(forward=Linear(fixed=forward), backward=Linear(fixed=backward))
    return CostTable(nodes={n: {tp: node for tp in tps} for n in names}, link=LinkCosts(latency=latency),
                     overhead_per_op=per_op)


def test_a_line_through_measured_points_keeps_both_parts_non_negative():
    assert Linear.fit([(1, 3.0), (5, 11.0)]) == Linear(fixed=1.0, per_row=2.0)
    assert Linear.fit([(1, 5.0), (4, 2.0)]).per_row == 0.0  # noise that falls: constant, not negative
    assert Linear.fit([(4, 2.0)]) == Linear(fixed=0.0, per_row=0.5)


def test_a_cost_table_round_trips_and_a_wrong_file_or_missing_size_is_named(tmp_path):
    table = _table()
    path = tmp_path / "costs.json"
    table.save(path)
    assert CostTable.load(path) == table
    (tmp_path / "bad.json").write_text(json.dumps({"format": 9}))
    with pytest.raises(ConfigError, match=r"--costs .*bad.json: a cost table of format 1 expected"):
        CostTable.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"no costs for node 'lm' at tp=4 \(measured: \[1, 2\]\)"):
        table.node("lm", 4)


def test_the_busiest_rank_group_sets_the_predicted_step():
    """avlm disjoint: four encoder-side nodes share ranks 0-1, the backbone has ranks 2-3; with equal
    costs per node the encoder side is busy 4 x M x (F + B) and the backbone waits."""
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.predict import predict_step
    from mimo_builder._internal.validation import validate_graph

    chain = validate_graph(avlm("disjoint4"), 4)
    predicted = predict_step(chain, _table(), 4, 8)
    assert predicted.step == pytest.approx(predicted.pipeline)  # no optimizer or reduction costs given
    layouts = chain.layouts
    assert layouts["lm"].ranks == range(2, 4)
    # ranks 0-1 run four encoder-side nodes, ranks 2-3 the backbone: the busiest side sets the pace
    assert predicted.pipeline >= 4 * 4 * (0.02 + 0.04) - 1e-9
    assert max(predicted.idle[r] for r in (2, 3)) > max(predicted.idle[r] for r in (0, 1))


def test_a_slower_link_makes_a_disjoint_placement_slower_and_leaves_a_colocated_one_alone():
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.predict import predict_step
    from mimo_builder._internal.validation import validate_graph

    disjoint, colocated = validate_graph(avlm("disjoint4"), 4), validate_graph(avlm("colocated4"), 4)
    fast, slow = _table(), _table(latency=0.05)
    assert predict_step(disjoint, slow, 2, 8).step > predict_step(disjoint, fast, 2, 8).step + 0.01
    assert predict_step(colocated, slow, 2, 8).step == pytest.approx(predict_step(colocated, fast, 2, 8).step)


def test_place_ranks_candidates_that_validate_and_the_fastest_comes_first():
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.place import search
    from mimo_builder._internal.validation import validate_graph

    everything, seen = search(avlm(), 4, _table(), 8, top=1000)
    assert seen == len(everything) > 10
    steps = [c.prediction.step for c in everything]
    assert steps == sorted(steps)
    assert {c.label.split()[0] for c in everything} == {"colocated", "disjoint", "mixed"}
    for candidate in everything[:10]:
        validate_graph(candidate.graph, 4)


def test_place_drops_placements_whose_memory_estimate_does_not_fit():
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.place import search

    roomy, _ = search(avlm(), 4, _table(), 8, memory=1 << 40, top=3)
    assert len(roomy) == 3 and all(c.memory is not None and c.memory <= 1 << 40 for c in roomy)
    tight, _ = search(avlm(), 4, _table(), 8, memory=1 << 10, top=3)
    assert tight == []


def test_place_writes_the_best_as_a_document_that_validates(tmp_path):
    costs, best = tmp_path / "costs.json", tmp_path / "best.yaml"
    _table().save(costs)
    done = main_in_process("place", "graphs/avlm.yaml", "--world-size", "4", "--costs", str(costs),
                           "-o", str(best), "--top", "3")
    assert done.returncode == 0, done.stderr
    assert "best: " in done.stdout and "searched" in done.stdout
    assert best.read_text().startswith("# mimo-builder place: ")
    checked = main_in_process("validate", str(best), "--world-size", "4")
    assert checked.returncode == 0, checked.stderr


def test_plan_with_costs_predicts_the_step_and_each_rank_groups_idle_share(tmp_path):
    costs = tmp_path / "costs.json"
    _table().save(costs)
    done = main_in_process("plan", "graphs/avlm.yaml", "--world-size", "4", "--microbatches", "4",
                           "--costs", str(costs))
    assert done.returncode == 0, done.stderr
    assert "predicted step: " in done.stdout and "ranks 2-3 (lm): idle" in done.stdout
    missing = main_in_process("plan", "graphs/avlm.yaml", "--world-size", "4", "--costs", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "not a readable cost table" in missing.stderr


def test_profile_measures_every_node_on_the_worlds_ranks_in_rounds_and_writes_a_table(tmp_path):
    out = tmp_path / "costs.json"
    done = main_in_process("profile", "graphs/mamba_lm.yaml", "--batch-size", "2", "--world-size", "2",
                           "--rounds", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "on 2 ranks, 2 round(s)" in done.stderr
    table = CostTable.load(out)
    for tp in (1, 2):  # tp=1 measured at dp=2: both cores busy, as a 2-rank run keeps them
        lm = table.node("lm", tp)
        assert lm.forward.at(1) > 0 and lm.backward.at(1) > 0 and lm.params > 0 and lm.spread >= 0
    assert table.node("lm", 2).params < table.node("lm", 1).params
    assert table.machine["device"] == "cpu" and table.machine["threads_per_rank"] >= 1
    assert (table.machine["ranks"], table.machine["rounds"]) == (2, 2)
