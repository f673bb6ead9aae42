"""Damaged checkpoints are named before anything is resumed: a truncated or deleted shard, and a
manifest whose placement is incomplete or impossible, in ``ckpt inspect`` and on load."""

import json
import shutil

import pytest

import yaml

from cli_in_process import ROOT, main_in_process
from multirank import run_ranks


def _save(root: str) -> None:
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer

    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(mamba_lm()).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    optimizer = GraphOptimizer(model)
    optimizer.step(GraphSchedule(model).forward_backward(synthetic_batch(model.valid, 2)))
    Checkpointer(model, optimizer).save(root, 1)
    model.close()


def _load(root: str) -> str:
    """The load's error, and whether any weight moved before it."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(mamba_lm(), seed=99).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    before = [p.detach().clone() for p in model.parameters()]
    try:
        Checkpointer(model, GraphOptimizer(model)).load(root)
        message = "loaded"
    except Exception as err:  # noqa: BLE001 - the test reads the message
        message = f"{type(err).__name__}: {err}"
    untouched = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.close()
    return message, untouched


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "root"
    run_ranks(1, _save, str(root))
    return root


def _copy(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    step = copy / "step_0000001"
    return copy, step, sorted(step.glob("*.distcp"))[0]


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_shard_is_named_by_inspect_and_before_a_load(saved, tmp_path, damage):
    copy, step, shard = _copy(saved, tmp_path)
    size = shard.stat().st_size
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
        expected = f"{shard}: {size // 2:,} bytes, the metadata needs"
    else:
        shard.unlink()
        expected = f"{shard}: missing"
    result = main_in_process("ckpt", "inspect", str(copy))
    assert result.returncode == 2 and "is damaged" in result.stderr and expected in result.stderr, result.stderr
    assert f"  - no other step under {copy} is intact" in result.stderr, result.stderr
    message, untouched = run_ranks(1, _load, str(copy))[0]
    assert message.startswith(f"CheckpointError: checkpoint {step} is damaged; load an earlier step"), message
    assert expected in message and untouched
    assert f"  - no other step under {copy} is intact" in message, message


def test_a_whole_checkpoint_inspects_and_loads(saved):
    result = main_in_process("ckpt", "inspect", str(saved))
    assert result.returncode == 0 and "every file the tensor metadata lists is present" in result.stdout
    assert run_ranks(1, _load, str(saved))[0] == ("loaded", False)


@pytest.mark.parametrize("placement, expected", [
    ({"offset": 0, "size": 1, "cp": 1, "pp": 1, "ep": 1}, "lacks tp"),
    ({"offset": 0, "size": 1, "tp": 0, "cp": 1, "pp": 1, "ep": 1}, "has tp 0"),
    ({"offset": 0, "size": 3, "tp": 2, "cp": 1, "pp": 1, "ep": 1}, "size 3 is not a multiple of tp x cp x pp"),
])
def test_a_manifest_with_an_impossible_placement_is_named(saved, tmp_path, placement, expected):
    copy, step, _ = _copy(saved, tmp_path)
    manifest = json.loads((step / "mimo.json").read_text())
    manifest["nodes"]["lm"]["placement"] = placement
    (step / "mimo.json").write_text(json.dumps(manifest))
    result = main_in_process("ckpt", "inspect", str(copy))
    assert result.returncode == 2 and "is not a readable manifest" in result.stderr, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_run_names_a_damaged_or_foreign_checkpoint_before_any_rank(saved, tmp_path):
    copy, step, shard = _copy(saved, tmp_path)
    shard.unlink()
    mamba_lm, vlm = str(ROOT / "graphs" / "mamba_lm.yaml"), str(ROOT / "graphs" / "vlm.yaml")
    for graph, load, expected in ((mamba_lm, copy, f"{shard}: missing"),
                                  (vlm, saved, "node 'vision' (vision) is not in the checkpoint")):
        result = main_in_process("run", graph, "--nproc", "1" if graph == mamba_lm else "4", "--steps", "2",
                                 "--load", str(load))
        assert result.returncode == 2 and "cannot resume from" in result.stderr and expected in result.stderr
        assert "Traceback" not in result.stderr and "step 2" not in result.stdout


@pytest.mark.parametrize("init, expected", [
    ({"node": "vision"}, "holds no node 'vision' (it has lm)"),
    ({}, "node 'vision' of"),
])
def test_an_init_checkpoint_that_does_not_hold_the_node_is_named_at_validate(saved, tmp_path, init, expected):
    data = yaml.safe_load((ROOT / "graphs" / "vlm.yaml").read_text())
    node = "lm" if init else "vision"
    data["nodes"][node]["init"] = {"checkpoint": str(saved), **init}
    if not init:
        data["nodes"]["vision"]["init"]["node"] = "lm"
        expected = "node 'lm' of"
    doc = tmp_path / "g.yaml"
    doc.write_text(yaml.safe_dump(data))
    result = main_in_process("validate", str(doc))
    assert result.returncode == 2 and f"node '{node}' init.checkpoint: " in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


def _save_into(root: str) -> str:
    try:
        _save(root)
        return "saved"
    except Exception as err:  # noqa: BLE001 - the test reads the message
        return f"{type(err).__name__}: {err}"


def test_a_full_disk_names_the_path_and_no_space(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        message = run_ranks(1, _save_into, str(disk / "ckpt"))[0]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert message.startswith(f"CheckpointError: saving step 1 under {disk / 'ckpt'}: no space left on its device"), \
        message


def _damage(step, how: str) -> None:
    shard = sorted(step.glob("*.distcp"))[0]
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "deleted":
        shard.unlink()
    elif how == "no manifest":
        (step / "mimo.json").unlink()
    else:  # an unreadable manifest
        (step / "mimo.json").write_text("{")


@pytest.mark.parametrize("how", ["truncated", "deleted", "no manifest", "bad manifest"])
def test_a_damaged_latest_step_names_the_last_intact_one_before_any_rank(saved, tmp_path, how):
    copy, intact, _ = _copy(saved, tmp_path)
    latest = copy / "step_0000008"
    shutil.copytree(intact, latest)
    (copy / "latest").write_text(latest.name)
    _damage(latest, how)
    graph = str(ROOT / "graphs" / "mamba_lm.yaml")
    result = main_in_process("run", graph, "--nproc", "1", "--steps", "2", "--load", str(copy))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "step 2" not in result.stdout
    assert f"{latest} is damaged; the last intact step is {intact}: --load {intact}\n" in result.stderr, \
        result.stderr
    if how in ("truncated", "deleted"):  # inspect reads the step's shards and names the intact one too
        inspected = main_in_process("ckpt", "inspect", str(copy))
        assert inspected.returncode == 2 and f"  - the last intact step is {intact}: --load {intact}" in \
            inspected.stderr, inspected.stderr
    result = main_in_process("run", graph, "--nproc", "1", "--steps", "2", "--save", str(copy), "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "step 2" not in result.stdout
    assert f"the last intact step is {intact}: --load {intact} in place of --resume" in result.stderr, result.stderr
    _damage(intact, "deleted")
    result = main_in_process("run", graph, "--nproc", "1", "--steps", "2", "--load", str(copy))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{latest} is damaged; no other step under {copy} is intact" in result.stderr, result.stderr
