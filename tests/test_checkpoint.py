"""Checkpoints: exact resume, resharding across placements, pretrained init, safety.

- 3 steps, save, 3 more equals 6 straight steps bitwise (losses, grad norms, weights) for
  disjoint encoders (DP2, distributed optimizer) feeding a pp=2 bf16 backbone on 4 ranks;
- the same checkpoint loads with pp2 -> pp1 and DP2 -> DP4: saved again there it holds the same
  weights, fp32 masters, Adam moments and step bitwise; the next loss within 1e-6, the one after
  within what one bf16 step's rounding allows; saved later, it loads back with pp1 -> pp2 and
  DP4 -> DP2;
- a disjoint4 vlm checkpoint loads colocated (4 ranks) and at TP2 -> TP1 (1 rank);
- ``init: {checkpoint: ...}`` starts one node from a project checkpoint and another from a
  unimodal Megatron-Core checkpoint; every other weight keeps its seeded value;
- a rank killed in the middle of a save leaves the previous step loadable;
- a checkpoint of another graph, a changed shape, a pickled payload: named errors, nothing loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

BATCH, SEED = 8, 11
EXACT, MODEL_FUNCTION = 0.0, 1e-6
# The step after a reshard. The loaded state is checked bitwise (..._holds_the_saved_state_bitwise),
# so the next-step loss differs only by the arithmetic of one bf16 step at DP4 instead of DP1. A bf16
# gradient element is a sum of partial gradients rounded to bf16 (unit roundoff u = 2^-8) on the way:
# ~3 roundings at DP1 (two microbatches' gradients, their sum), ~5 at DP4 (the same, then a sum over
# 4 ranks), so the two differ by up to ROUNDINGS * u relative. Adam's update lr * m/sqrt(v) is
# scale-free in g: each fp32 master then moves by up to ROUNDINGS * u * lr more or less (its bf16
# copy flips a last bit with probability |that|/ulp: the same move in expectation). The next loss
# moves by sum_i |dL/dw_i| * ROUNDINGS * u * lr <= ROUNDINGS * u * lr * sqrt(N) * |grad L|_2 over
# the N weights: here ~2e-3 relative, against 1.6e-5 and 4e-5 measured on two x86 machines and
# 1e-1 when the Adam state is not loaded.
BF16_U, ROUNDINGS = 2.0 ** -8, 8


def _encoders(placed: bool):
    """Disjoint encoders (DP2) -> a pp=2 bf16 backbone when placed; all on 4 ranks (DP4) when not."""
    from test_pipeline import _graph

    graph = _graph("encoders", placed)
    graph.nodes["lm"].config["dtype"] = "bf16"
    for node in graph.nodes.values():
        node.ddp["use_distributed_optimizer"] = True
    return graph


def _vlm(placement: str):
    from graphs.vlm import vlm

    return vlm(placement)


def _build(graph, seed=SEED, total_steps=6):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=seed).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    return model, GraphSchedule(model), GraphOptimizer(model, total_steps=total_steps)


def _steps(run, first: int, last: int):
    """(loss, grad norm) of steps first..last, each on its own batch."""
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model, schedule, optimizer = run
    out = []
    for step in range(first, last + 1):
        optimizer.zero_grad()
        loss = schedule.forward_backward(synthetic_batch(model.valid, BATCH, seed=100 + step), 2)
        out.append((loss, optimizer.step(loss).grad_norm))
    return out


def _local_weights(model):
    return [p.detach().clone() for n in model.valid.order if model.hosts(n)
            for c in model.chunks(n) for p in c.parameters()]


# --- resume and reshard -------------------------------------------------------------------------

def _resume_and_reshard(root):
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build(_encoders(placed=True))
    _steps(run, 1, 3)
    Checkpointer(run[0], run[2]).save(root, 3)
    straight = _steps(run, 4, 6)
    straight_weights = _local_weights(run[0])

    again = _build(_encoders(placed=True), seed=SEED + 1)  # other initial weights: the load must matter
    resumed_info = Checkpointer(again[0], again[2]).load(root)
    resumed = _steps(again, 4, 6)
    same_weights = all(torch.equal(a, b) for a, b in zip(straight_weights, _local_weights(again[0])))

    moved = _build(_encoders(placed=False), seed=SEED + 1)
    moved_info = Checkpointer(moved[0], moved[2]).load(root)
    Checkpointer(moved[0], moved[2]).save(f"{root}/reloaded", 3)  # what DP4/pp1 holds now, saved again
    weights, lr = sum(w.numel() for w in _local_weights(moved[0])), max(moved[2].learning_rates().values())
    resharded = _steps(moved, 4, 5)
    Checkpointer(moved[0], moved[2]).save(f"{root}/pp1", 5)  # and back: pp1 -> pp2, DP4 -> DP2
    (moved6,) = _steps(moved, 6, 6)
    back = _build(_encoders(placed=True), seed=SEED + 2)
    Checkpointer(back[0], back[2]).load(f"{root}/pp1")
    (back6,) = _steps(back, 6, 6)
    return dict(straight=straight, resumed=resumed, same_weights=same_weights, resumed_info=resumed_info,
                resharded=resharded, moved_info=moved_info, moved6=moved6, back6=back6, weights=weights, lr=lr)


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="module")
def resume_runs(resume_root):
    return run_ranks(4, _resume_and_reshard, str(resume_root))


def _saved_tensors(step_dir):
    """Every tensor of a checkpoint by its global key, read on this one process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
           if isinstance(m, TensorStorageMetadata)}
    load(out, checkpoint_id=str(step_dir), no_dist=True)
    return out


def test_resume_equals_the_straight_run_bitwise(resume_runs):
    for r in resume_runs:
        assert r["resumed"] == r["straight"]  # losses and grad norms, exactly
        assert r["same_weights"]
        assert r["resumed_info"].step == 3 and r["resumed_info"].resharded == () and r["resumed_info"].reset == ()


def test_checkpoint_reshards_pp1_to_pp2_and_dp4_to_dp2(resume_runs):
    for r in resume_runs:
        (loss, _), (reference, _) = r["back6"], r["moved6"]
        assert abs(loss - reference) <= MODEL_FUNCTION * abs(reference)


def test_checkpoint_reshards_pp2_to_pp1_and_dp2_to_dp4(resume_runs):
    for r in resume_runs:
        (loss4, _), (loss5, _) = r["resharded"]
        (ref4, _), (ref5, _) = r["straight"][:2]
        (_, norm5), bf16_step = r["straight"][1], ROUNDINGS * BF16_U * r["lr"] * r["weights"] ** 0.5
        assert abs(loss4 - ref4) <= MODEL_FUNCTION * abs(ref4)  # same model function
        assert abs(loss5 - ref5) <= MODEL_FUNCTION * abs(ref5) + bf16_step * norm5  # one bf16 step apart
        assert set(r["moved_info"].resharded) == {"enc", "lm"}
        assert any("generator states" in note for note in r["moved_info"].reset)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # read on one process
def test_checkpoint_resharded_to_dp4_holds_the_saved_state_bitwise(resume_runs, resume_root):
    """Saved again at DP4/pp1 right after the load: the same weights, fp32 masters and Adam moments
    (every tensor, by its global key) and the same Adam step; only the generator states differ."""
    saved, again = (_saved_tensors(resume_root / d / "step_0000003") for d in (".", "reloaded"))
    assert saved.keys() == again.keys() and any(k.startswith("optimizer.state.exp_avg_sq.lm.") for k in saved)
    assert [k for k in saved if not k.startswith("rng.") and not torch.equal(saved[k], again[k])] == []
    manifests = [json.loads((resume_root / d / "step_0000003" / "mimo.json").read_text()) for d in (".", "reloaded")]
    optimizer = [{n: (r["optimizer"], r["scheduler_steps"]) for n, r in m["nodes"].items()} for m in manifests]
    assert optimizer[0] == optimizer[1] and optimizer[0]["lm"][0]["optimizer"]["param_groups"][0]["step"] == 3


# --- disjoint -> colocated -> one rank ------------------------------------------------------------

def _save_disjoint(root):
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build(_vlm("disjoint4"))
    _steps(run, 1, 2)
    Checkpointer(run[0], run[2]).save(root, 2)
    (reference,) = _steps(run, 3, 3)
    colocated = _build(_vlm("colocated4"), seed=SEED + 1)
    Checkpointer(colocated[0], colocated[2]).load(root)
    return reference, _steps(colocated, 3, 3)[0]


@pytest.fixture(scope="module")
def disjoint_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    results = run_ranks(4, _save_disjoint, str(root))
    return root, results[0][0], [r[1] for r in results]


def test_disjoint_checkpoint_loads_colocated(disjoint_checkpoint):
    _, (reference, _), colocated = disjoint_checkpoint
    for loss, _ in colocated:
        assert abs(loss - reference) <= MODEL_FUNCTION * abs(reference)


def _one_rank_checks(root, scratch):
    """On one rank: TP2 -> TP1, pretrained init from both kinds of source, and refusals."""
    from megatron.core import dist_checkpointing

    from mimo_builder._internal.checkpoint import CheckpointError, Checkpointer, UnsafeCheckpointError
    from mimo_builder._internal.document.graph import NodeInit

    out = {}
    single = _build(_vlm("single"), seed=SEED + 1)
    Checkpointer(single[0], single[2]).load(root)
    weights = lambda m, n: [p.detach().clone() for c in m.chunks(n) for p in c.parameters()]  # noqa: E731
    saved = {n: weights(single[0], n) for n in ("vision", "proj")}
    out["tp1_loss"] = _steps(single, 3, 3)[0][0]

    # a unimodal MCore checkpoint of a bare backbone (keys without a node prefix)
    lm_only = _build(_vlm("single"), seed=SEED + 2)
    bare = lm_only[0].chunks("lm")[0]
    from megatron.core.utils import unwrap_model

    unimodal = os.path.join(scratch, "unimodal")
    os.makedirs(unimodal)
    dist_checkpointing.save(unwrap_model(bare).sharded_state_dict(
        metadata={"dp_cp_group": lm_only[0].pg_collection("lm").dp_cp}), unimodal)
    graph = _vlm("single")
    graph.nodes["vision"].init = NodeInit(checkpoint=str(root))
    graph.nodes["vision"].frozen = True
    graph.nodes["lm"].init = NodeInit(checkpoint=unimodal)
    started = _build(graph, seed=SEED + 3)[0]
    fresh = _build(_vlm("single"), seed=SEED + 3)[0]
    out["vision_from_project"] = all(torch.equal(a, b) for a, b in zip(weights(started, "vision"), saved["vision"]))
    out["vision_params"] = len(weights(started, "vision"))
    out["lm_from_unimodal"] = all(torch.equal(a, b) for a, b in zip(weights(started, "lm"), weights(lm_only[0], "lm")))
    out["proj_seeded"] = all(torch.equal(a, b) for a, b in zip(weights(started, "proj"), weights(fresh, "proj")))
    out["proj_differs_from_checkpoint"] = not all(
        torch.equal(a, b) for a, b in zip(weights(started, "proj"), saved["proj"]))

    errors = {}
    from graphs.mamba_lm import mamba_lm

    lm_run = _build(mamba_lm())
    lm_root = os.path.join(scratch, "lm_only")
    Checkpointer(lm_run[0], lm_run[2]).save(lm_root, 1)
    before = _local_weights(single[0])
    for label, action in {
        "another_graph": lambda: Checkpointer(single[0], single[2]).load(lm_root),
        "overwrite": lambda: Checkpointer(single[0], single[2]).save(lm_root, 2),
        "shape": lambda: _load_with_other_vocab(root),
        "pickled_code": lambda: Checkpointer(single[0], single[2]).load(_poisoned_copy(root, scratch)),
    }.items():
        try:
            action()
            errors[label] = None
        except (CheckpointError, UnsafeCheckpointError) as err:
            errors[label] = f"{type(err).__name__}: {err}"
    out["errors"] = errors
    out["untouched_by_refusals"] = all(torch.equal(a, b) for a, b in zip(before, _local_weights(single[0])))
    return out


def _load_with_other_vocab(root):
    from mimo_builder._internal.checkpoint import Checkpointer

    graph = _vlm("single")
    graph.nodes["lm"].config["vocab_size"] = 300
    run = _build(graph)
    Checkpointer(run[0], run[2]).load(root)


def _poisoned_copy(root, scratch):
    """A copy of the checkpoint whose DCP metadata pickle would run a shell command."""
    from mimo_builder._internal.checkpoint.files import resolve

    copy = os.path.join(scratch, "poisoned")
    shutil.copytree(resolve(root), copy)
    with open(os.path.join(copy, ".metadata"), "wb") as f:
        pickle.dump(_Payload(os.path.join(scratch, "pwned")), f)
    return copy


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def one_rank(disjoint_checkpoint, tmp_path_factory):
    root = disjoint_checkpoint[0]
    scratch = tmp_path_factory.mktemp("scratch")
    return run_ranks(1, _one_rank_checks, str(root), str(scratch))[0], scratch


def test_tp2_checkpoint_loads_on_one_rank(disjoint_checkpoint, one_rank):
    reference = disjoint_checkpoint[1][0]
    assert abs(one_rank[0]["tp1_loss"] - reference) <= MODEL_FUNCTION * abs(reference)


def test_nodes_start_from_the_checkpoints_their_document_names(one_rank):
    out = one_rank[0]
    assert out["vision_params"] > 0 and out["vision_from_project"]
    assert out["lm_from_unimodal"]
    assert out["proj_seeded"] and out["proj_differs_from_checkpoint"]


def test_a_checkpoint_that_does_not_fit_is_named_before_anything_loads(one_rank):
    errors = one_rank[0]["errors"]
    assert "node 'vision' (vision) is not in the checkpoint" in errors["another_graph"]
    assert "holds checkpoints of another graph" in errors["overwrite"]
    assert "node 'lm'" in errors["shape"] and "vocab_size: 256 (checkpoint) vs 300 (here)" in errors["shape"]
    assert "UnsafeCheckpointError" in errors["pickled_code"] and "posix.system" in errors["pickled_code"]
    assert not (one_rank[1] / "pwned").exists()
    assert one_rank[0]["untouched_by_refusals"]


def test_local_spec_checkpoints_use_transformer_engine_key_names(disjoint_checkpoint):
    """Where MCore's TE spec fuses a norm into the next linear (IdentityOp in place of the norm),
    the local spec's separate norm is saved under the fused name, so either spec loads the other's."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec
    from megatron.core.transformer.identity_op import IdentityOp

    from mimo_builder._internal.checkpoint.files import resolve
    from mimo_builder._internal.checkpoint.safe_load import safe_unpickling

    with safe_unpickling():
        keys = set(dist_checkpointing.load_tensors_metadata(str(resolve(disjoint_checkpoint[0]))))
    fused_into = {"norm": "mixer.in_proj", "input_layernorm": "self_attention.linear_qkv",
                  "pre_mlp_layernorm": "mlp.linear_fc1"}  # TE fuses a norm into the linear after it
    hybrid, vit = hybrid_stack_spec.submodules, get_vit_layer_with_transformer_engine_spec()
    # vlm's backbone has pattern "M*-M"; MCore stacks the ViT's layers under one key (a layer axis)
    layers = {"lm.decoder.layers.0.": hybrid.mamba_layer, "lm.decoder.layers.1.": hybrid.attention_layer,
              "lm.decoder.layers.2.": hybrid.mlp_layer, "lm.decoder.layers.3.": hybrid.mamba_layer,
              "vision.decoder.layers.": vit}
    checked = 0
    for layer, spec in layers.items():
        for norm, linear in fused_into.items():
            fused_in_te = getattr(spec.submodules, norm, None) is IdentityOp
            if fused_in_te and any(k.startswith(layer + linear + ".") for k in keys):
                assert layer + linear + ".layer_norm_weight" in keys
                assert not any(k.startswith(layer + norm + ".") for k in keys)
                checked += 1
    assert checked == 6  # 2 Mamba layers, the attention layer, the MLP layer, the ViT's two norms


# --- a save killed midway ------------------------------------------------------------------------

def _save_then_die(root, groups):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.checkpoint import Checkpointer

    # MCore's writer starts a multiprocessing manager (its results queue) in each rank; killed with
    # its rank, it would live on: the rank and all it starts form a group the test ends at once
    os.setpgid(0, 0)
    open(os.path.join(groups, str(os.getpid())), "w").close()
    os.environ["TMPDIR"] = os.path.dirname(root)  # the manager's socket folder, left by a kill
    run = _build(mamba_lm())
    _steps(run, 1, 1)
    Checkpointer(run[0], run[2]).save(root, 1)
    _steps(run, 2, 2)
    write = filesystem_async.FileSystemWriterAsync.write_preloaded_data

    def write_then_die(*args, **kwargs):
        result = write(*args, **kwargs)
        if dist.get_rank() == 1:
            os._exit(9)  # a rank lost in the middle of the save, its shard half written
        return result

    filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(write_then_die)
    Checkpointer(run[0], run[2]).save(root, 2)


def _resume_after_crash(root):
    """(step resumed from, its next step, the same step of a straight run)."""
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.checkpoint import Checkpointer

    run = _build(mamba_lm(), seed=SEED + 1)
    info = Checkpointer(run[0], run[2]).load(root)
    (step2,) = _steps(run, 2, 2)
    Checkpointer(run[0], run[2]).save(root, 2)
    return info.step, step2, _steps(_build(mamba_lm()), 1, 2)[1]


def test_a_rank_killed_during_save_leaves_the_previous_step(tmp_path):
    from mimo_builder._internal.platform.launch import RankError, launch

    root, groups = tmp_path / "ckpt", tmp_path / "groups"
    groups.mkdir()
    try:
        with pytest.raises(RankError):
            launch(_save_then_die, 2, str(root), str(groups), timeout_s=240)  # its own ranks: one dies
    finally:
        for group in os.listdir(groups):  # the ranks and what they started (left by the kill)
            try:
                os.killpg(int(group), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert (root / "latest").read_text() == "step_0000001"
    assert (root / ".step_0000002.partial").exists() and not (root / "step_0000002").exists()
    for step, after, straight in run_ranks(2, _resume_after_crash, str(root)):
        assert step == 1 and after == straight
    assert (root / "latest").read_text() == "step_0000002"
    assert not (root / ".step_0000002.partial").exists()  # the next save cleaned it up
    assert json.loads((root / "step_0000002" / "mimo.json").read_text())["step"] == 2
