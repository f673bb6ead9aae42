"""The walker: each node built and wrapped on its own ranks, shared groups, failures on all ranks."""

import resource
import time

import torch
import torch.distributed as dist

from multirank import run_ranks


def _init():
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- the one-node graph equals the direct build ----------------------------------------------

def _one_node_vs_direct(tp):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import create_process_groups
    from mimo_builder._internal.validation import validate_graph
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    _init()
    graph = mamba_lm(tp=tp)
    (composite,) = CompositeBuilder(graph, seed=7).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    via_graph = _params(composite.chunks("lm")[0])
    layout = validate_graph(graph, dist.get_world_size()).layouts["lm"]
    pgs = create_process_groups([layout]).for_layout(layout)
    seed_rng(7, tp_rank=pgs.tp.rank())
    from mimo_builder._internal.kinds.loading import node_config

    from mimo_builder._internal.assembly.seeded_init import seeded_hook

    config = node_config(graph.nodes["lm"], "lm")
    seeded = seeded_hook(7, "lm", config.make_builder().param_inits(), pgs)  # the walker's first pre-wrap hook
    config = config.model_copy(update={"pre_wrap_hooks": [seeded]})
    (direct,) = config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
    direct = _params(direct)
    same = via_graph.keys() == direct.keys() and all(torch.equal(via_graph[k], direct[k]) for k in direct)
    return same, len(direct), type(composite.chunks("lm")[0]).__name__


def test_one_node_graph_equals_direct_build_bitwise_at_world_1():
    (result,) = run_ranks(1, _one_node_vs_direct, 1)
    assert result[0] and result[1] > 10 and result[2] == "DistributedDataParallel"


def test_one_node_graph_equals_direct_build_bitwise_at_tp2():
    for same, count, _ in run_ranks(2, _one_node_vs_direct, 2):
        assert same and count > 10


# --- disjoint nodes: nothing is built where a node does not live -------------------------------

def _disjoint_memory():
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.document.graph import Graph, Placement
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from submodels.projector import ProjectorConfig

    _init()
    big = ProjectorConfig(input_size=4096, output_size=4096, ffn_hidden_size=4096)  # ~33.6M params
    small = ProjectorConfig(input_size=4096, output_size=8)
    graph = (Graph().add("big", big, placement=Placement(offset=0, size=1))
             .add("small", small, placement=Placement(offset=1, size=1))
             .connect("big.output", "small.input").bind("x", "big.input").output("small.output"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (composite,) = CompositeBuilder(graph).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    hosted = sorted(composite.nodes)
    return hosted, sum(p.numel() for p in composite.parameters()), grown


def test_a_node_not_hosted_costs_zero_parameter_memory():
    (hosted0, params0, grown0), (hosted1, params1, grown1) = run_ranks(2, _disjoint_memory)
    assert hosted0 == ["big"] and hosted1 == ["small"]
    assert params0 > 30_000_000 and params1 < 100_000
    # rank 0 holds the big weights (fp32 + DDP grad buffer, > 128 MB); rank 1 none of them
    assert grown0 > 128 and grown1 < 40, (grown0, grown1)


# --- shared groups, frozen nodes, per-node DDP options, hooks ---------------------------------

def _shared_groups_frozen_ddp():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mimo_builder._internal.document.graph import Graph, Placement
    from mimo_builder._internal.placement import count_process_groups, create_process_groups
    from mimo_builder._internal.validation import validate_graph
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from submodels.projector import ProjectorConfig

    _init()
    seen = []
    graph = (Graph()
             .add("a", ProjectorConfig(input_size=8, output_size=8), placement=Placement(size=2),
                  ddp={"bucket_size": 1000, "overlap_grad_reduce": True})
             .add("b", ProjectorConfig(input_size=8, output_size=8), placement=Placement(size=2), frozen=True)
             .add("c", ProjectorConfig(input_size=8, output_size=8), placement=Placement(size=2, tp=2))
             .connect("a.output", "b.input").connect("b.output", "c.input").bind("x", "a.input")
             .output("c.output"))
    graph.hooks.pre_wrap.append(lambda chunks: seen.append(type(chunks[0]).__name__) or chunks)
    (composite,) = CompositeBuilder(graph).build_distributed_models(
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    a, b = composite.chunks("a")[0], composite.chunks("b")[0]
    layouts = list(validate_graph(graph, world_size=2).layouts.values())
    before = dist.distributed_c10d._world.group_count  # new_group calls made by this rank
    create_process_groups(layouts).destroy()
    return dict(
        created=dist.distributed_c10d._world.group_count - before, counted=count_process_groups(layouts),
        counted_per_node=sum(count_process_groups([layout]) for layout in layouts),
        shared=composite.pg_collection("a").dp is composite.pg_collection("b").dp,
        separate=composite.pg_collection("a").dp is not composite.pg_collection("c").dp,
        groups=composite.process_groups.num_groups,
        a_ddp=(isinstance(a, DistributedDataParallel), a.ddp_config.overlap_grad_reduce,
               a.ddp_config.grad_reduce_in_fp32),
        b_frozen=(not isinstance(b, DistributedDataParallel), any(p.requires_grad for p in b.parameters())),
        hooks=seen,
    )


def test_nodes_share_groups_by_layout_frozen_skip_ddp_node_ddp_overrides():
    for r in run_ranks(2, _shared_groups_frozen_ddp):
        assert r["shared"] and r["separate"]
        assert r["created"] == r["counted"] == r["groups"]  # the plan's count is what gets created
        assert r["counted"] < r["counted_per_node"]  # two distinct layouts, not three nodes
        assert r["a_ddp"] == (True, True, True)  # node option over the graph-wide default
        assert r["b_frozen"] == (True, False)
        assert r["hooks"] == ["Projector", "Projector", "Projector"]


# --- a failure on one rank becomes an error on every rank --------------------------------------

def _fail_on_rank(bad_rank):
    def hook(chunks):
        if dist.get_rank() == bad_rank:
            raise RuntimeError(f"injected failure on rank {bad_rank}")
        return chunks
    return hook


def _build_with_failure(bad_rank):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.document.graph import Graph, Placement
    from mimo_builder._internal.assembly.walker import BuildError, CompositeBuilder
    from submodels.projector import ProjectorConfig

    _init()
    node = ProjectorConfig(input_size=8, output_size=8)
    graph = (Graph().add("enc", node, placement=Placement(offset=0, size=2))
             .add("dec", node, placement=Placement(offset=2, size=2), hooks={"pre_wrap": [_fail_on_rank(bad_rank)]})
             .connect("enc.output", "dec.input").bind("x", "enc.input").output("dec.output"))
    start = time.monotonic()
    try:
        # data_parallel_random_init: rank 3 waits in a broadcast for the failed rank 2
        CompositeBuilder(graph).build_distributed_models(
            ddp_config=DistributedDataParallelConfig(), data_parallel_random_init=True)
    except BuildError as err:
        return str(err), time.monotonic() - start
    return "built", time.monotonic() - start


def test_a_build_error_on_one_rank_of_four_is_an_error_on_every_rank():
    """Rank 3 waits for rank 2 in a broadcast when rank 2 fails: rank 2's groups close at once (an
    aborted gloo group keeps its sockets while anything holds it, the failure's frames included),
    so every rank names rank 2's failure well within the 20 s that a build's collective may wait."""
    results = run_ranks(4, _build_with_failure, 2, timeout_s=120)
    for message, seconds in results:
        assert "rank 2 failed building node 'dec'" in message and "injected failure" in message, message
        assert seconds < 10, seconds
