"""LoRA checkpoints: a node's adapters only, an exact resume, a TP2 -> TP1 reshard (the same next
loss: the seed gives the same base at any placement), the base from
``init:`` and merged exports, and adapters refused on the base of another seed."""

import pytest
import torch

from lora_graphs import BATCH, LORA, SEED, adapters, build, lora_vlm
from multirank import run_ranks


# --- checkpoints: adapters only, exact resume, resharded ---------------------------------------

def _train_and_save(root):
    from mimo_builder._internal.assembly.tp_shard import unshard, unwrap
    from mimo_builder._internal.checkpoint.checkpointer import Checkpointer
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = build(lora_vlm("disjoint4"))
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, OptimizerSettings(lr=1e-2))
    losses, saved = [], None
    for step in (1, 2):
        optimizer.zero_grad()
        losses.append(schedule.forward_backward(synthetic_batch(model.valid, BATCH, seed=step)))
        optimizer.step()
        if step == 1:
            Checkpointer(model, optimizer).save(root, step)
            if model.hosts("lm"):
                lm = unwrap(model.chunks("lm")[0])
                tp = model.pg_collection("lm").tp
                saved = {k: unshard(p, _full_shape(p, tp.size()), tp) for k, p in adapters(lm).items()}
    return losses, saved


def _full_shape(p, tp_size):
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp_size
    return torch.Size(shape)


def _resume(root, placement):
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.checkpoint.checkpointer import Checkpointer
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = build(lora_vlm(placement))
    schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, OptimizerSettings(lr=1e-2))
    Checkpointer(model, optimizer).load(root)
    loaded = {k: p.detach().clone() for k, p in adapters(unwrap(model.chunks("lm")[0])).items()} \
        if model.hosts("lm") and placement == "single" else None
    optimizer.zero_grad()
    loss = schedule.forward_backward(synthetic_batch(model.valid, BATCH, seed=2))
    return loss, loaded


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpt")
    results = run_ranks(4, _train_and_save, str(root))
    saved = next(s for _, s in results if s is not None)
    return root, results[0][0], saved


def test_a_lora_checkpoint_holds_the_backbones_adapters_only(lora_checkpoint):
    from megatron.core import dist_checkpointing

    from mimo_builder._internal.checkpoint import files

    root, _, _ = lora_checkpoint
    step_dir = files.resolve(root)
    keys = set(dist_checkpointing.load_tensors_metadata(str(step_dir)))
    lm = {k for k in keys if k.startswith("lm.")}
    assert lm and all(".lora_a" in k or ".lora_b" in k for k in lm), sorted(lm)[:5]
    assert any(k.startswith("vision.") and "lora" not in k for k in keys)  # fully trained nodes stay whole
    manifest = files.read_manifest(step_dir)
    assert manifest.nodes["lm"].adapters_only and not manifest.nodes["vision"].adapters_only


def test_a_lora_run_resumes_exactly_and_reshards(lora_checkpoint):
    root, straight, saved = lora_checkpoint
    resumed = run_ranks(4, _resume, str(root), "disjoint4")
    assert all(loss == straight[1] for loss, _ in resumed), ([r[0] for r in resumed], straight)
    loss, adapters = run_ranks(1, _resume, str(root), "single")[0]
    assert adapters.keys() == saved.keys()
    assert all(torch.equal(adapters[k], saved[k]) for k in saved)  # TP2 -> TP1, in_proj's packed B too
    # the base is not in the checkpoint: the seed gives the same one at TP1, so the next loss is TP2's
    assert abs(loss - straight[1]) <= 1e-5 * abs(straight[1]), (loss, straight[1])


# --- the base from init:, merged export ---------------------------------------------------------

MAMBA = dict(builder="mamba", num_layers=2, hybrid_layer_pattern="MM", hidden_size=64, num_attention_heads=1,
             vocab_size=100, seq_length=32, mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2,
             mamba_num_heads=8)


def _lm_logits(root: str, seed: int, hf: str | None, lora: dict | None, export_to: str | None,
               randomize_b: bool = False) -> torch.Tensor:
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.hf import export_node
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    graph = Graph().add("lm", MAMBA, init={"hf": f"{root}/{hf}"} if hf else None, lora=lora)
    graph.bind("input_ids", "lm.input_ids").output("lm.logits")
    (model,) = CompositeBuilder(graph, seed=seed).build_distributed_models(wrap_with_ddp=False)
    if randomize_b:
        generator = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name, p in model.chunks("lm")[0].named_parameters():
                if name.endswith("lora_b"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.valid.builders["lm"].run(model.chunks("lm")[0], {"input_ids": ids})["logits"][..., :100]
    if export_to:  # (the padded vocabulary rows are zeros after an import, seeded in a fresh build)
        export_node(model, "lm", f"{root}/{export_to}")
    model.close()
    return logits


def _base_and_export(root: str) -> dict:
    pretrained = _lm_logits(root, 1, None, None, "base")
    fresh = _lm_logits(root, 2, "base", {"rank": 4}, None)  # another seed: the base must come from init
    adapted = _lm_logits(root, 2, "base", {"rank": 4, "alpha": 16}, "merged", randomize_b=True)
    reloaded = _lm_logits(root, 3, "merged", None, None)
    return dict(pretrained=pretrained, fresh=fresh, adapted=adapted, reloaded=reloaded)


def test_the_base_comes_from_init_and_the_export_holds_merged_weights(tmp_path):
    r = run_ranks(1, _base_and_export, str(tmp_path))[0]
    assert torch.equal(r["fresh"], r["pretrained"])
    assert not torch.allclose(r["adapted"], r["pretrained"], atol=1e-3)
    error = float((r["reloaded"] - r["adapted"]).abs().max() / r["adapted"].abs().max())
    assert error <= 1e-5, error


def test_resuming_adapters_on_the_base_of_another_seed_is_named(lora_checkpoint):
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.checkpoint.files import CheckpointError
    from mimo_builder._internal.validation import validate_graph

    root, _, _ = lora_checkpoint
    valid = validate_graph(lora_vlm("disjoint4"), 4)
    check_resumable(valid, root, SEED)  # the seed it was trained with
    with pytest.raises(CheckpointError, match=f"node 'lm': its base weights come from the seed, and the checkpoint's "
                                              f"adapters were trained on the base of seed {SEED}, not 5"):
        check_resumable(valid, root, 5)


def test_resuming_adapters_with_other_lora_settings_is_named(lora_checkpoint):
    from mimo_builder._internal.checkpoint import files
    from mimo_builder._internal.checkpoint.checkpointer import check_resumable
    from mimo_builder._internal.validation import validate_graph

    root, _, _ = lora_checkpoint
    record = files.read_manifest(files.resolve(root)).nodes["lm"].lora
    assert (record.rank, record.alpha) == (LORA["rank"], LORA["alpha"]) and record.targets, record
    other = validate_graph(lora_vlm("disjoint4", lm={**LORA, "alpha": 2 * LORA["alpha"]}), 4)
    with pytest.raises(files.CheckpointError, match=f"node 'lm' lora: alpha {LORA['alpha']} in the checkpoint, "
                                                    f"{2 * LORA['alpha']} in the document"):
        check_resumable(other, root, SEED)
