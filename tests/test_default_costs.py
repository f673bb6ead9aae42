"""The plan says when a node's costs are ModelBuilder's guess: a builder without its own
``stage_costs()`` (examples/custom_node.py's PatchMLPBuilder) gets a warning naming the node, its
builder and what was assumed, in the printed plan and in ``plan --json``; the shipped kinds, which
all count their own layers, get none."""

import json

from cli_in_process import ROOT, main_in_process

from mimo_builder._internal.kinds.builder import ModelBuilder
from mimo_builder._internal.kinds.registry import Registry

NO_COSTS = "no stage_costs()"


def _plan(*args):
    run = main_in_process(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_a_kind_without_stage_costs_is_named_in_the_plans_warnings():
    example = Registry(("examples",), roots=[str(ROOT)]).resolve_builder("examples.custom_node:PatchMLPBuilder")
    assert example.stage_costs is ModelBuilder.stage_costs  # the premise: the example kind relies on the default
    data = json.loads(_plan("--allow", "examples", "plan", "examples/custom_graph.yaml", "--world-size", "2", "--json"))
    (warning,) = [w for w in data["warnings"] if NO_COSTS in w]
    assert warning.startswith("node 'encoder' (builder 'examples.custom_node:PatchMLPBuilder'): no stage_costs(); "
                              "its FLOPs and activations assume 1 transformer layer of hidden 1 on 1 token per sample "
                              "(ModelBuilder's default)")
    text = " ".join(_plan("--allow", "examples", "plan", "examples/custom_graph.yaml", "--world-size", "2").split())
    assert "warning: node 'encoder' (builder 'examples.custom_node:PatchMLPBuilder'): no stage_costs()" in text


def test_a_shipped_graph_has_no_default_cost_warning():
    data = json.loads(_plan("plan", "graphs/vlm.yaml", "--world-size", "4", "--json"))
    assert not [w for w in data["warnings"] if NO_COSTS in w]
