"""Background saves (``run --async-save``): the write runs in a process forked from each rank while
training goes on, and the step it publishes is the state at its step, bitwise: resuming from it
equals resuming from a blocking save of the same step. A step is published only once every
rank's writer is done."""

from __future__ import annotations

import torch

from cli_in_process import main_in_process
from multirank import run_ranks

SEED, BATCH = 5, 4


def _graph():
    from graphs.vlm import vlm

    graph = vlm("colocated_dp2")
    for node in graph.nodes.values():
        node.config["dtype"] = "bf16"
        node.ddp["use_distributed_optimizer"] = True
    return graph


def _run():
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(), seed=SEED).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    optimizer = GraphOptimizer(model, total_steps=8)
    return model, GraphSchedule(model), optimizer, Checkpointer(model, optimizer)


def _step(run, step: int) -> tuple[float, float]:
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model, schedule, optimizer, _ = run
    optimizer.zero_grad()
    loss = schedule.forward_backward(synthetic_batch(model.valid, BATCH, seed=step))
    return float(loss), float(optimizer.step(loss).grad_norm)


def _weights(run) -> dict[str, torch.Tensor]:
    model = run[0]
    return {f"{n}.{k}": p.detach().float().clone() for n in model.valid.order if model.hosts(n)
            for chunk in model.chunks(n) for k, p in chunk.named_parameters()}


def _saves(root: str) -> dict:
    """Run A saves step 2 in the background and trains on to step 4 meanwhile; run B saves step 2
    blocking. Each is resumed in a fresh build and steps 3-4 are run from it."""
    import os

    a = _run()
    for step in (1, 2):
        _step(a, step)
    a[3].save(f"{root}/a", 2, background=True)
    published_at_once = os.path.exists(f"{root}/a/latest")
    meanwhile = [_step(a, 3)]
    published = a[3].finish_background() + a[3].finish_background(wait=True)
    meanwhile.append(_step(a, 4))
    b = _run()
    for step in (1, 2):
        _step(b, step)
    b[3].save(f"{root}/b", 2)
    straight = [_step(b, 3), _step(b, 4)]
    out = {"published_at_once": published_at_once, "published": [p.name for p in published],
           "meanwhile": meanwhile, "straight": straight, "straight_weights": _weights(b)}
    for name in ("a", "b"):
        run = _run()
        run[3].load(f"{root}/{name}")
        out[name] = {"steps": [_step(run, 3), _step(run, 4)], "weights": _weights(run)}
        run[0].close()
    a[0].close()
    b[0].close()
    return out


def test_a_background_save_holds_its_steps_state_bitwise(tmp_path):
    results = run_ranks(2, _saves, str(tmp_path), timeout_s=400)
    for got in results:
        assert not got["published_at_once"] and got["published"] == ["step_0000002"], got["published"]
        assert got["meanwhile"] == got["straight"]  # training went on unchanged while the writer wrote
        for name in ("a", "b"):
            assert got[name]["steps"] == got["straight"], name
            assert all(torch.equal(got[name]["weights"][k], w) for k, w in got["straight_weights"].items()), name


def test_run_async_save_publishes_each_step_and_needs_save(tmp_path, capfd):
    from cli_in_process import run_in_process

    root = tmp_path / "ckpt"
    result = run_in_process(capfd, "run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", "5", "--batch-size", "4",
                            "--save", str(root), "--save-interval", "2", "--async-save")
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (2, 4):
        assert f"saving step {step} in the background" in result.stdout, result.stdout
        assert f"saved step {step} to {root}/step_000000{step}" in result.stdout, result.stdout
    assert f"saved step 5 to {root}/step_0000005" in result.stdout
    assert (root / "latest").read_text().strip() == "step_0000005"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004", "step_0000005"]
    refused = main_in_process("run", "graphs/mamba_lm.yaml", "--steps", "2", "--async-save")
    assert refused.returncode == 2 and "--async-save need --save DIR" in refused.stderr, refused.stderr
