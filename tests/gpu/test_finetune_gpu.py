"""Fine-tuning paths on one CUDA rank (NCCL, world size 1): Megatron-FSDP per node against MCore
DDP, and LoRA adapters.

- ``ddp: {use_megatron_fsdp: true}`` on the vlm backbone: two SGD steps give the losses and
  gradient norms the same graph gives with DDP (fp32; on one rank both reduce nothing, so the
  only difference is the order of the optimizer's arithmetic over flat buffers: 1e-5 relative).
- ``lora: {rank: 4, alpha: 8}`` on the backbone: two steps train, only the adapters move, and
  merging them gives the adapted loss.
- ``GraphSchedule.generate`` through MCore's Triton decode kernels: the argmax chain of full forwards.

CPU refuses Megatron-FSDP by node and field (docs/architecture.md says why), so this is where
it is checked.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_cases import case, on_cuda_rank, run_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL rank)")]

BATCH, LR, STEPS = 4, 0.1, 2


def _graph(fsdp: bool = False, lora: bool = False):
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    data = vlm("single").as_dict()
    if fsdp:
        data["nodes"]["lm"]["ddp"] = {"use_megatron_fsdp": True,
                                      "data_parallel_sharding_strategy": "optim_grads_params"}
    if lora:
        data["nodes"]["lm"]["lora"] = {"rank": 4, "alpha": 8}
    return Graph.from_dict(data)


def _steps(graph) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    device = compat.init_runtime("auto")
    (model,) = CompositeBuilder(graph, seed=5).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.0, mcore={"sgd_momentum": 0.0})
    schedule, optimizer = GraphSchedule(model, device=device), GraphOptimizer(model, sgd)
    batch = synthetic_batch(model.valid, BATCH, seed=6)
    lm = model.chunks("lm")[0]
    before = {k: p.detach().clone() for k, p in lm.named_parameters()}
    losses, norms = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(schedule.forward_backward(batch))
        norms.append(optimizer.step().grad_norm)
    moved = sorted(k for k, p in lm.named_parameters() if not torch.equal(p.detach(), before[k]))
    out = dict(losses=losses, norms=norms, moved=moved)
    if graph.nodes["lm"].lora is not None:
        from mimo_builder._internal.assembly.lora import merge_lora

        adapted = schedule.evaluate(batch)["lm.loss"]
        merge_lora(model)
        out.update(adapted=adapted, merged=schedule.evaluate(batch)["lm.loss"])
    model.close()
    return out


def _generation() -> dict:
    """Incremental greedy decoding on CUDA (MCore's Triton decode kernels) against the argmax
    chain of full forwards, 4 prompts of 24 tokens, 6 new tokens."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    device = compat.init_runtime("auto")
    (model,) = CompositeBuilder(_graph(), seed=5).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    batch = synthetic_batch(model.valid, 4, seed=6)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["loss_mask"][:, 23:] = 1.0
    new = GraphSchedule(model, device=device).generate(batch, 6)
    with torch.no_grad():
        image = model.valid.builders["proj"].run(model.chunks("proj")[0].eval(), {"input": model.valid.builders[
            "vision"].run(model.chunks("vision")[0].eval(), {"pixel_values": batch["pixel_values"].to(device)})[
            "embeddings"]})["output"]
        ids, reference = batch["input_ids"].to(device).clone(), []
        for k in range(6):
            logits = model.valid.builders["lm"].run(model.chunks("lm")[0].eval(), {"input_ids": ids, "image": image})
            reference.append(logits["logits"][:, 23 + k, :256].argmax(dim=-1))
            ids[:, 24 + k] = reference[-1]
    model.close()
    return dict(generated=new.cpu(), reference=torch.stack(reference, dim=1).cpu())


def _all_cases() -> dict:
    return run_cases({"ddp": (_steps, _graph()), "fsdp": (_steps, _graph(fsdp=True)),
                      "lora": (_steps, _graph(lora=True)), "generate": (_generation,)})


@pytest.fixture(scope="module")
def results():
    return on_cuda_rank(_all_cases)


def test_megatron_fsdp_node_takes_the_steps_ddp_takes(results):
    ddp, fsdp = case(results, "ddp"), case(results, "fsdp")
    for a, b in zip(ddp["losses"] + ddp["norms"], fsdp["losses"] + fsdp["norms"]):
        assert math.isfinite(b) and abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (ddp, fsdp)


def test_lora_trains_only_adapters_on_cuda(results):
    r = case(results, "lora")
    assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][1] < r["losses"][0], r
    assert r["moved"] and all(k.endswith(("lora_a", "lora_b")) for k in r["moved"]), r["moved"][:5]
    assert abs(r["merged"] - r["adapted"]) <= 1e-5 * abs(r["adapted"]), r


def test_incremental_generation_on_cuda_is_the_argmax_chain_of_full_forwards(results):
    r = case(results, "generate")
    assert torch.equal(r["generated"], r["reference"]), r
