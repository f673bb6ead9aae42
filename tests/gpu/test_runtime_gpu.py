"""Every runtime path on one CUDA rank (NCCL, world size 1), through the public entry points.

The shipped graphs (mamba_lm, vlm, avlm) in fp32 and bf16, a frozen node and a text-only batch
train for a few steps with ``mimo_builder._internal.runtime.train.train`` (two microbatches per step);
a post-wrap hook captures the built model so that the test can see its parameters. Losses must
be finite, every trainable node's parameters must change (a frozen node's must not), all
parameters must live on the GPU, and none of the CPU workarounds may have been applied in the
CUDA process. One spawned rank runs every case; each case is one test here.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_cases import case, on_cuda_rank, run_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL rank)")]

STEPS, BATCH, MICROBATCHES, LR = 2, 4, 2, 1e-3
TRAIN_CASES = {  # name -> (graph, dtype, frozen nodes)
    "mamba_lm-fp32": ("mamba_lm", "fp32", ()),
    "mamba_lm-bf16": ("mamba_lm", "bf16", ()),
    "vlm-fp32": ("vlm", "fp32", ()),
    "vlm-bf16": ("vlm", "bf16", ()),
    "avlm-fp32": ("avlm", "fp32", ()),
    "avlm-bf16": ("avlm", "bf16", ()),
    "vlm-fp32-frozen-vision": ("vlm", "fp32", ("vision",)),
    "text_only-bf16": ("text_only", "bf16", ()),
}


# --- inside the rank process --------------------------------------------------------------------

def _graph(name: str):
    from graphs import parts
    from graphs.avlm import avlm
    from graphs.mamba_lm import mamba_lm
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    if name == "text_only":  # a backbone with modality ports and nothing connected to them
        lm = parts.backbone(image=parts.IMAGE_TOKEN, audio=parts.AUDIO_TOKEN)
        graph = Graph().add("lm", lm)
        for key in ("input_ids", "labels", "loss_mask"):
            graph.bind(key, f"lm.{key}")
        return graph.output("lm.loss")
    return {"mamba_lm": mamba_lm, "vlm": lambda: vlm("single"), "avlm": lambda: avlm("single")}[name]()


def _parameters(model) -> dict[tuple[str, str], torch.nn.Parameter]:
    return {(node, key): p for node in model.valid.order if model.hosts(node)
            for chunk in model.chunks(node) for key, p in chunk.named_parameters()}


_CAPTURED: list = []  # (model, initial weights) per build, in the rank process


def _capture(models):
    """Graph post-wrap hook: keeps the built CompositeModel and a copy of its initial weights
    (a module-level function, so that copies of the graph document still reach this list)."""
    (model,) = models
    _CAPTURED.append((model, {k: p.detach().clone() for k, p in _parameters(model).items()}))
    return models


def _train(train_case: str, seed: int) -> dict:
    from mimo_builder._internal.runtime.train import TrainOptions, train

    name, dtype, frozen = TRAIN_CASES[train_case]
    graph = _graph(name)
    for node_name, node in graph.nodes.items():
        node.config["dtype"] = dtype
        node.frozen = node_name in frozen
    graph.hooks.post_wrap.append(_capture)
    _CAPTURED.clear()
    losses = train(graph, TrainOptions(steps=STEPS, batch_size=BATCH, num_microbatches=MICROBATCHES,
                                       lr=LR, seed=seed))
    ((model, initial),) = _CAPTURED
    params = _parameters(model)
    changed = {}
    for (node, key), p in params.items():
        changed[node] = changed.get(node, False) or not torch.equal(p.detach(), initial[(node, key)])
    return dict(losses=list(losses), changed=changed, frozen=list(frozen),
                devices=sorted({p.device.type for p in params.values()}),
                dtypes=sorted({str(p.dtype) for p in params.values()}))


def _schedule_equals_plain_forward() -> dict:
    """GraphSchedule's loss on CUDA against the same nodes composed in one plain forward."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    device = compat.init_runtime("auto")
    (model,) = CompositeBuilder(vlm("single"), seed=5).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    batch = synthetic_batch(model.valid, BATCH, seed=6)
    loss = GraphSchedule(model, device=device).forward_backward(batch)
    outputs = {}
    with torch.no_grad():
        for name in model.valid.order:
            inputs = {port: batch[key].to(device) for key, (node, port) in model.valid.inputs.items() if node == name}
            inputs.update({e.dst_port: outputs[e.src][e.src_port] for e in model.valid.edges if e.dst == name})
            outputs[name] = model.valid.builders[name].run(model.chunks(name)[0], inputs)
    return dict(schedule=loss, plain=float(outputs["lm"]["loss"]))


def _workarounds() -> dict:
    """Traces the CPU-only patches would have left in this process."""
    from megatron.core.tensor_parallel import random as mcore_random

    from submodels import mamba_cpu

    return dict(current_device_module=torch.cuda.current_device.__module__,
                cpu_kernels=mamba_cpu.cpu_kernels_installed(),
                rng_tracker=type(mcore_random.get_cuda_rng_tracker()).__name__)


def _all_cases() -> dict:
    """Run every case in this rank; a case that raises records its traceback instead."""
    sections = {name: (_train, name, seed) for seed, name in enumerate(TRAIN_CASES, start=11)}
    sections.update(parity=(_schedule_equals_plain_forward,), workarounds=(_workarounds,))
    return run_cases(sections)


# --- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    return on_cuda_rank(_all_cases)



@pytest.mark.parametrize("name", TRAIN_CASES)
def test_trains_on_cuda(results, name):
    r = case(results, name)
    assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"]), r
    assert r["devices"] == ["cuda"], r
    assert ("torch.bfloat16" in r["dtypes"]) == (TRAIN_CASES[name][1] == "bf16"), r
    for node, changed in r["changed"].items():
        assert changed == (node not in r["frozen"]), f"{node}: parameters changed={changed}; {r}"


def test_schedule_loss_equals_plain_forward(results):
    r = case(results, "parity")
    assert math.isfinite(r["schedule"]) and abs(r["schedule"] - r["plain"]) <= 1e-5 * max(1.0, abs(r["plain"])), r


def test_no_cpu_workaround_in_the_cuda_process(results):
    r = case(results, "workarounds")
    assert r == dict(current_device_module="torch.cuda", cpu_kernels=False, rng_tracker=r["rng_tracker"]), r
    assert r["rng_tracker"] != "CPURNGStatesTracker", r
