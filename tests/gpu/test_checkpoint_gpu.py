"""Checkpoints on a GPU: exact resume on CUDA, and the same checkpoint moving CUDA -> CPU -> CUDA.

One CUDA rank (NCCL) trains the vlm graph (bf16 backbone, Megatron-Core's distributed optimizer
with fp32 masters) for 2 steps, saves, and trains steps 3-4; a second build from another seed
loads the checkpoint and must repeat steps 3-4 bitwise. A CPU rank (gloo) then loads the CUDA
checkpoint (weights bitwise as saved; generator states reported as seeded afresh) and saves it
again; a CUDA rank loads that CPU checkpoint and must take step 3 exactly as the straight run did
(same weights, fp32 masters and Adam moments after the round trip).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL rank)")]

BATCH, SEED, MICROBATCHES = 4, 21, 2


# --- inside the rank processes ------------------------------------------------------------------

def _build(device: str, seed: int):
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    resolved = compat.init_runtime(device)
    graph = vlm("single")
    graph.nodes["lm"].config["dtype"] = "bf16"
    for node in graph.nodes.values():
        node.ddp["use_distributed_optimizer"] = True
    (model,) = CompositeBuilder(graph, seed=seed).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model, GraphSchedule(model, device=resolved), GraphOptimizer(model, total_steps=4)


def _steps(run, first: int, last: int) -> list[tuple[float, float]]:
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model, schedule, optimizer = run
    out = []
    for step in range(first, last + 1):
        optimizer.zero_grad()
        loss = schedule.forward_backward(synthetic_batch(model.valid, BATCH, seed=100 + step), MICROBATCHES)
        out.append((loss, optimizer.step(loss).grad_norm))
    return out


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for n in model.valid.order
            for c in model.chunks(n) for p in c.parameters()]


def _on_cuda(root: str) -> dict:
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build("cuda", SEED)
    _steps(run, 1, 2)
    Checkpointer(run[0], run[2]).save(f"{root}/cuda", 2)
    saved = _weights(run[0])
    straight = _steps(run, 3, 4)
    again = _build("cuda", SEED + 1)
    info = Checkpointer(again[0], again[2]).load(f"{root}/cuda")
    resumed = _steps(again, 3, 4)
    return dict(saved=saved, straight=straight, resumed=resumed, reset=info.reset,
                device=str(next(again[0].chunks("lm")[0].parameters()).device))


def _cuda_to_cpu(root: str) -> dict:
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build("cpu", SEED + 2)
    info = Checkpointer(run[0], run[2]).load(f"{root}/cuda")
    Checkpointer(run[0], run[2]).save(f"{root}/cpu", 2)
    return dict(weights=_weights(run[0]), reset=info.reset, step=info.step)


def _cpu_to_cuda(root: str) -> dict:
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build("cuda", SEED + 3)
    info = Checkpointer(run[0], run[2]).load(f"{root}/cpu")
    return dict(weights=_weights(run[0]), step3=_steps(run, 3, 3)[0], reset=info.reset)


# --- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mimo_builder._internal.platform.launch import RankError, launch

    root = str(tmp_path_factory.mktemp("ckpt"))
    out = {}
    try:
        out["cuda"] = launch(_on_cuda, 1, root, backend="nccl", timeout_s=150)[0]
        out["cpu"] = launch(_cuda_to_cpu, 1, root, backend="gloo", timeout_s=150)[0]
        out["back"] = launch(_cpu_to_cuda, 1, root, backend="nccl", timeout_s=150)[0]
    except RankError as err:
        pytest.fail(f"a rank failed:\n{err.trace}", pytrace=False)
    return out


def test_resume_on_cuda_is_bitwise(runs):
    r = runs["cuda"]
    assert r["device"].startswith("cuda"), r["device"]
    assert r["resumed"] == r["straight"], (r["resumed"], r["straight"])
    assert r["reset"] == (), r["reset"]


def test_a_cuda_checkpoint_loads_on_cpu_with_the_saved_weights(runs):
    cpu, saved = runs["cpu"], runs["cuda"]["saved"]
    assert cpu["step"] == 2
    assert len(cpu["weights"]) == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(cpu["weights"], saved))
    assert any("saved on cuda, running on cpu" in note for note in cpu["reset"]), cpu["reset"]


def test_the_cpu_copy_takes_the_straight_runs_next_step_on_cuda(runs):
    back, straight = runs["back"], runs["cuda"]["straight"]
    assert all(torch.equal(a, b) for a, b in zip(back["weights"], runs["cuda"]["saved"]))
    assert back["step3"] == straight[0], (back["step3"], straight[0])
    assert any("saved on cpu, running on cuda" in note for note in back["reset"]), back["reset"]
