"""What the profile does not know: a run's seconds from its undisturbed steps, costs from the
fastest of several rounds, the rounds' spread kept per node, and `place` saying when the top
placements cannot be told apart (then picking the simplest)."""

import re

import pytest

from cli_in_process import main_in_process
from test_place import _table

from mimo_builder._internal.planning.cost_table import CostTable, Linear, LinkCosts, NodeCosts


def _with_spread(table: CostTable, spread: float) -> CostTable:
    return table.model_copy(update={"nodes": {n: {tp: c.model_copy(update={"spread": spread}) for tp, c in per.items()}
                                              for n, per in table.nodes.items()}})


def test_a_runs_seconds_are_the_mean_of_its_fastest_quarter_of_steps():
    from mimo_builder._internal.planning.profile import fastest_steps

    walls = [0.10, 0.30, 0.12, 0.20, 0.50, 0.40, 0.35, 0.25]  # a slow spell in the middle
    samples = [{("lm", "forward"): w / 2} for w in walls]
    found = fastest_steps(walls, samples)
    assert found["wall"] == pytest.approx(0.11)  # steps 0 and 2; the median would be 0.275
    assert found["nodes"] == {"lm": {"forward": pytest.approx(0.055)}}


def _rank_report(forward: float, params: int = 10) -> dict:
    """What one rank of a one-node run reports: one microbatch count, no link."""
    nodes = {"lm": {"forward": forward, "backward": 2 * forward, "communication": 0.0, "optimizer": 0.01,
                    "reduction": 0.004}}
    return {"nodes": nodes, "wall": 4 * forward, "runs": {1: {"nodes": nodes, "wall": 4 * forward}},
            "batched": {1: []}, "params": {"lm": params}, "link": None}


def test_a_cost_is_the_median_round_and_the_spread_how_much_slower_the_slowest_round_ran():
    from mimo_builder._internal.planning.profile import _Found

    found = _Found(ops=2, ranks=4)
    for round_, forward in enumerate((0.12, 0.10, 0.20)):  # the third round hit a slow spell
        found.add(round_, [_rank_report(forward), _rank_report(forward * 0.9)], {"lm": 2}, 2, 4)
    lm = found.into(CostTable(allreduce=LinkCosts(latency=0.001))).node("lm", 2)
    assert lm.forward.at(4) == pytest.approx(0.12)  # the median round, the slower rank's seconds
    assert lm.backward.at(4) == pytest.approx(0.24)
    assert lm.spread == pytest.approx(0.2 / 0.12 - 1)  # the slowest round over the median
    assert lm.params == 10
    assert lm.reduction == pytest.approx(0.003)  # at dp=2: beyond the all-reduce's latency

def test_the_slow_end_of_a_table_scales_each_node_by_its_own_spread():
    table = CostTable(nodes={"a": {1: NodeCosts(forward=Linear(fixed=1.0, per_row=0.5), backward=Linear(fixed=2.0),
                                                optimizer=0.1, spread=0.25)},
                             "b": {1: NodeCosts(forward=Linear(fixed=1.0), backward=Linear(fixed=1.0))}})
    slow = table.slowed()
    assert slow.node("a", 1).forward.at(2) == pytest.approx(1.25 * 2.0)
    assert slow.node("a", 1).backward.at(2) == pytest.approx(2.5)
    assert slow.node("a", 1).optimizer == pytest.approx(0.125)
    assert slow.node("b", 1) == table.node("b", 1)  # measured without spread: unchanged


def test_place_picks_the_fastest_unless_its_order_changes_within_the_spread_then_the_simplest():
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.place import pick, search

    ranked, _ = search(avlm(), 4, _table(), 8, top=1000)
    best, tied = pick(ranked)
    assert best is ranked[0] and best.label.startswith("mixed")  # equal steps: the first of the simplest
    assert all(c.prediction.step == ranked[0].prediction.step for c in tied)

    colocated = next(c for c in ranked if (c.label, c.microbatches) == ("colocated tp=1 dp=4", 1))
    assert colocated.prediction.step > ranked[0].prediction.step * 1.05
    ranked[0].high = 2 * ranked[0].prediction.step
    colocated.high = 1.1 * ranked[0].high  # slower at both ends: told apart
    assert pick(ranked)[0] is not colocated
    colocated.high = 0.9 * ranked[0].high  # faster at the slow end: the order changes, the simpler wins
    best, tied = pick(ranked)
    assert best is colocated and colocated in tied and ranked[0] in tied


def test_place_prints_each_range_and_says_when_the_top_overlap(tmp_path):
    costs, best = tmp_path / "costs.json", tmp_path / "best.yaml"
    _with_spread(_table(), 1.0).save(costs)
    done = main_in_process("place", "graphs/avlm.yaml", "--world-size", "4", "--costs", str(costs), "--top", "30",
                           "-o", str(best))
    assert done.returncode == 0, done.stderr
    assert "step (spread)" in done.stdout and "180.0-360.0 ms" in done.stdout
    # every node twice as slow at the slow end: the order holds, only equal steps are ties
    assert "overlap within the profile's measured spread, and 5 of them cannot be told apart" in done.stdout
    assert "best: mixed 1+1+2: feeders tp=1, backbone tp=1, --microbatches 1" in done.stdout
    assert best.read_text().startswith("# mimo-builder place: mixed 1+1+2: feeders tp=1, backbone tp=1; run with")


def test_a_nodes_measured_reduction_is_part_of_its_ranks_step():
    from graphs.avlm import avlm
    from mimo_builder._internal.planning.predict import predict_step
    from mimo_builder._internal.validation import validate_graph

    valid = validate_graph(avlm("colocated4"), 4)
    table = _table()
    lm = {tp: c.model_copy(update={"reduction": 0.05}) for tp, c in table.nodes["lm"].items()}
    slower = table.model_copy(update={"nodes": {**table.nodes, "lm": lm}})
    assert predict_step(valid, slower, 2, 8).step == pytest.approx(predict_step(valid, table, 2, 8).step + 0.05)


def test_plan_with_costs_gives_the_step_from_the_fastest_costs_to_their_slow_end(tmp_path):
    costs = tmp_path / "costs.json"
    _with_spread(_table(), 0.5).save(costs)
    done = main_in_process("plan", "graphs/avlm.yaml", "--world-size", "4", "--microbatches", "1",
                           "--costs", str(costs))
    assert done.returncode == 0, done.stderr
    low, high = map(float, re.search(r"predicted step: ([\d.]+)-([\d.]+) ms", done.stdout).groups())
    assert high == pytest.approx(1.5 * low, abs=0.1)  # no per-step or per-operation costs in this table
