"""Each node's throughput and MFU in the run log: the FLOP count of a real placement gathered to
rank 0, the arithmetic of the rates, and the datasheet peaks."""

import pytest
import torch

from graphs import parts
from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.platform.peak import device_peak_flops
from mimo_builder._internal.runtime.throughput import NodeWork, graph_mfu, node_rates, throughput_line
from tests.multirank import run_ranks

BATCH, MICROBATCHES = 4, 2


def _disjoint_vlm() -> Graph:
    """vision and proj on rank 0, the backbone on rank 1."""
    first, second = Placement(offset=0, size=1), Placement(offset=1, size=1)
    return (Graph().add("vision", parts.vision(), placement=first).add("proj", parts.projector(), placement=first)
            .add("lm", parts.backbone(image=parts.IMAGE_TOKEN), placement=second)
            .connect("vision.embeddings", "proj.input").connect("proj.output", "lm.image")
            .bind("pixel_values", "vision.pixel_values").bind("input_ids", "lm.input_ids")
            .bind("labels", "lm.labels").bind("loss_mask", "lm.loss_mask").output("lm.loss"))


def _work_on_ranks(graph):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.throughput import graph_work

    device = compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=0).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    with model:
        return graph_work(model, BATCH, MICROBATCHES, device, peak_tflops=2.0)


def test_rank_0_gets_every_nodes_flops_counted_where_the_node_lives():
    graph = _disjoint_vlm()
    first, second = run_ranks(2, _work_on_ranks, graph)
    assert second is None and list(first) == ["vision", "proj", "lm"]
    proj, tokens = parts.projector(), parts.vision().num_tokens
    # fc1 (in x ffn) and fc2 (ffn x out) on every image token; 2 FLOPs per multiply-add, x3 for training
    expected = 3 * 2 * BATCH * tokens * (proj.input_size * proj.ffn_hidden_size + proj.ffn_hidden_size * proj.output_size)
    assert first["proj"] == NodeWork(1, BATCH * tokens, expected, 2e12, reads_tokens=False)
    assert first["lm"].reads_tokens and first["lm"].tokens == BATCH * parts.backbone().seq_length
    assert first["lm"].flops > first["vision"].flops > expected

    from mimo_builder._internal.planning.estimate import estimate_plan
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.runtime.pipeline import plan_graph

    plan = make_plan(graph, 2)
    planned = estimate_plan(plan, plan_graph(plan.valid, MICROBATCHES), micro_batch_size=BATCH // MICROBATCHES)
    assert {n: w.flops for n, w in first.items()} == {n: e.flops_per_step for n, e in planned.nodes.items()}


def test_rates_divide_a_nodes_flops_over_its_ranks_time_and_peak():
    work = {"vision": NodeWork(ranks=2, tokens=1000, flops=8e12, peak=1e12),
            "lm": NodeWork(ranks=4, tokens=4000, flops=40e12, peak=2e12, reads_tokens=True)}
    rates = node_rates(work, seconds=2.0)
    assert rates["vision"].tflops_per_rank == pytest.approx(2.0) and rates["vision"].mfu == pytest.approx(2.0)
    assert rates["lm"].tflops_per_rank == pytest.approx(5.0) and rates["lm"].mfu == pytest.approx(2.5)
    assert rates["lm"].tokens_per_s == pytest.approx(2000.0)
    # each node at its own peak, over all 6 ranks' 2 s: (8 + 20) / 12
    assert graph_mfu(work, world_size=6, seconds=2.0) == pytest.approx(28 / 12)
    # half the batch tokens: the backbone's count halves, the encoder's stays
    half = node_rates(work, seconds=2.0, tokens=2000)
    assert half["lm"].tflops_per_rank == pytest.approx(2.5) and half["lm"].tokens_per_s == pytest.approx(1000.0)
    assert half["vision"].tflops_per_rank == pytest.approx(2.0)


def test_the_line_shows_mfu_only_where_flops_and_a_peak_are_known():
    work = {"enc": NodeWork(1, 100, 5e9, None), "custom": NodeWork(1, 100, None, 1e12),
            "lm": NodeWork(1, 300, 4e12, 1e13)}
    line = throughput_line(work, world_size=1, seconds=1.0)
    assert line == ("    throughput: enc 5 GFLOP/s/rank, 100 tokens/s | custom 100 tokens/s | "
                    "lm 4 TFLOP/s/rank, MFU 40.0%, 300 tokens/s")
    assert throughput_line({"lm": work["lm"]}, 1, 1.0).startswith("    throughput (MFU 40.0%): ")


@pytest.mark.parametrize(("name", "dtype", "tf32", "tflops"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, None, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, None, 756.0),
    ("NVIDIA H200", torch.float16, None, 989.4),
    ("NVIDIA H200", torch.float32, True, 494.7),
    ("NVIDIA H200", torch.float32, False, 66.9),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, None, 312.0),
])
def test_datasheet_peaks_by_device_name_and_dtype(name, dtype, tf32, tflops):
    assert device_peak_flops(name, dtype, tf32) == pytest.approx(tflops * 1e12)


def test_a_device_not_in_the_table_has_no_peak():
    assert device_peak_flops("cpu", torch.bfloat16) is None
    assert device_peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
