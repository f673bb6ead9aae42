"""LoRA adapters per node (``lora:`` in the document): validation, outputs, TP parity, merge,
plan counts; a pipelined LoRA node (its checkpoints: tests/test_lora_checkpoints.py)."""

import pytest
import torch
import torch.distributed as dist

from cli_in_process import main_in_process
from lora_graphs import BATCH, LORA, LR, adapters, build, eval_loss, lora_vlm
from multirank import run_ranks


def _adapter_params_of_the_vlm_backbone(rank: int) -> int:
    """rank * (in + out) of every linear of graphs.parts.backbone(): pattern M*-M, hidden 64,
    Mamba expand 2, 2 groups of state 16, head dim 16; 4 heads without GQA; MLP 4 x hidden."""
    hidden, d_inner, groups, state, head_dim = 64, 128, 2, 16, 16
    in_proj = (hidden, 2 * d_inner + 2 * groups * state + d_inner // head_dim)
    mamba = [in_proj, (d_inner, hidden)]
    attention = [(hidden, 3 * hidden), (hidden, hidden)]
    mlp = [(hidden, 4 * hidden), (4 * hidden, hidden)]
    layers = 2 * mamba + attention + mlp
    return sum(rank * (i + o) for i, o in layers)


# --- validation (no ranks) ------------------------------------------------------------------

@pytest.mark.parametrize("lora, frozen, message", [
    ({"rank": 4, "targets": ["in_proj", "linear_qvk"]}, False, "node 'lm' lora.targets: 'linear_qvk' is not a linear"),
    ({"rank": 4, "targets": []}, False, "node 'lm' lora.targets: empty"),
    ({"rank": 4}, True, "node 'lm' lora: a frozen node trains nothing"),
    ({"rank": 0}, False, "lora.rank"),
    ({"rank": 4, "dropout": 1.0}, False, "lora.dropout"),
    ({"rank": 4, "alpha": -1}, False, "lora.alpha"),
])
def test_bad_lora_settings_are_named_by_node_and_field(tmp_path, lora, frozen, message):
    from graphs.vlm import vlm

    data = vlm("single").as_dict()
    data["nodes"]["lm"]["lora"] = lora
    data["nodes"]["lm"]["frozen"] = frozen
    doc = tmp_path / "g.yaml"
    import yaml

    doc.write_text(yaml.safe_dump(data))
    result = main_in_process("validate", str(doc))
    assert result.returncode == 2, result
    assert message in result.stderr + result.stdout, result.stderr
    assert "Traceback" not in result.stderr


def test_megatron_fsdp_per_node_is_refused_on_cpu_by_node_and_field(tmp_path):
    import yaml

    from graphs.vlm import vlm

    data = vlm("single").as_dict()
    data["nodes"]["lm"]["ddp"] = {"use_megatron_fsdp": True}
    doc = tmp_path / "g.yaml"
    doc.write_text(yaml.safe_dump(data))
    result = main_in_process("validate", str(doc))
    assert result.returncode == 2 and "node 'lm' ddp.use_megatron_fsdp: Megatron-FSDP runs on CUDA" in result.stderr


def test_the_plan_counts_adapters_as_the_only_trained_parameters():
    from mimo_builder._internal.planning.estimate import estimate_plan
    from mimo_builder._internal.planning.plan import make_plan
    from mimo_builder._internal.planning.table import pipeline_plan

    full, lora = make_plan(lora_vlm(lm=None), 1), make_plan(lora_vlm(), 1)
    node = {n.name: n for n in lora.nodes}["lm"]
    base = {n.name: n for n in full.nodes}["lm"]
    expected = _adapter_params_of_the_vlm_backbone(4)
    assert node.trainable_params == expected
    assert node.params == base.params + expected
    memory_full, memory_lora = (estimate_plan(p, pipeline_plan(p, 1)).node_memory[0]["lm"] for p in (full, lora))
    assert memory_lora.grads == expected * 4  # fp32 gradients of the adapters only
    assert memory_lora.optimizer == expected * 8  # Adam's two fp32 moments
    assert memory_lora.params == (base.params + expected) * 4
    assert memory_full.optimizer == base.params * 8


# --- one rank: outputs, training state, merge ------------------------------------------------

def _one_rank_checks():
    from mimo_builder._internal.assembly.lora import merge_lora, merged_state_dict
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    base = build(lora_vlm(lm=None))
    batch = synthetic_batch(base.valid, BATCH, seed=11)
    base_loss = eval_loss(base, batch)
    base.close()
    model = build(lora_vlm(proj={"rank": 2, "targets": ["linear_fc2"]}))
    out = {"base": base_loss, "fresh": eval_loss(model, batch)}
    lm = unwrap(model.chunks("lm")[0])
    out["trained"] = sorted(n for n, p in lm.named_parameters() if p.requires_grad)
    out["proj_trained"] = sorted(n for n, p in unwrap(model.chunks("proj")[0]).named_parameters() if p.requires_grad)
    out["ddp_buffer"] = sum(b.numel_unpadded for b in model.chunks("lm")[0].buffers)
    optimizer = GraphOptimizer(model, OptimizerSettings(lr=1e-3))
    held = {id(p) for p in lm.parameters()}
    out["optimized"] = sorted(n for n, p in lm.named_parameters()
                              if any(id(q) == id(p) for g in optimizer.nodes["lm"].optimizer.param_groups
                                     for q in g["params"]) and id(p) in held)
    with torch.no_grad():  # adapters as after training: B no longer zero
        generator = torch.Generator().manual_seed(5)
        for name, p in lm.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    out["adapted"] = eval_loss(model, batch)
    merged = merged_state_dict(lm)
    out["merge_count"] = merge_lora(model)
    out["merged"] = eval_loss(model, batch)
    weights = {n: p.detach() for n, p in lm.named_parameters() if not n.endswith(("lora_a", "lora_b"))}
    out["merged_state_matches"] = all(torch.allclose(merged[n], w, atol=1e-6) for n, w in weights.items())
    out["merged_state_keys"] = sorted(merged) == sorted(k for k in lm.state_dict() if ".lora_" not in k)
    model.close()
    return out


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(1, _one_rank_checks)[0]


def test_fresh_adapters_leave_the_outputs_unchanged(one_rank):
    assert one_rank["fresh"] == one_rank["base"]  # B = 0: exactly the base's loss


def test_only_adapters_get_gradients_buffers_and_optimizer_state(one_rank):
    trained = one_rank["trained"]
    assert trained and all(n.endswith(("lora_a", "lora_b")) for n in trained)
    assert {n.rsplit(".", 2)[-2] for n in trained} == {"in_proj", "out_proj", "linear_qkv", "linear_proj",
                                                       "linear_fc1", "linear_fc2"}
    assert one_rank["proj_trained"] == ["encoder.linear_fc2.lora_a", "encoder.linear_fc2.lora_b"]
    assert one_rank["ddp_buffer"] == _adapter_params_of_the_vlm_backbone(4)
    assert one_rank["optimized"] == trained


def test_merged_weights_give_the_adapted_outputs(one_rank):
    assert one_rank["adapted"] != one_rank["fresh"]  # the adapters change the output
    assert one_rank["merge_count"] == 4 * 2 + 1  # lm: 4 layers x 2 linears; proj: its fc2
    assert abs(one_rank["merged"] - one_rank["adapted"]) <= 1e-5 * abs(one_rank["adapted"])
    assert one_rank["merged_state_matches"] and one_rank["merged_state_keys"]


# --- TP=2 equals TP=1 after a step ------------------------------------------------------------

def _sgd_step(model, batch):
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    sgd = OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.5, mcore={"sgd_momentum": 0.0})
    optimizer = GraphOptimizer(model, sgd)
    optimizer.zero_grad()
    loss = GraphSchedule(model).forward_backward(batch)
    return loss, optimizer.step().grad_norm


def _tp_reference():
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = build(lora_vlm(proj=LORA, vision=LORA))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B != 0, so A's gradient (and its TP path) is exercised too
        for name in ("lm", "proj", "vision"):
            for n, p in adapters(unwrap(model.chunks(name)[0])).items():
                if n.endswith("lora_b"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    initial = {n: {k: p.detach().clone() for k, p in unwrap(model.chunks(n)[0]).named_parameters()}
               for n in model.valid.order}
    loss, norm = _sgd_step(model, synthetic_batch(model.valid, BATCH, seed=11))
    updated = {n: {k: p.detach().clone() for k, p in adapters(unwrap(model.chunks(n)[0])).items()}
               for n in ("lm", "proj", "vision")}
    return initial, loss, norm, updated


def _tp2_step(initial):
    from mimo_builder._internal.assembly.tp_shard import unshard, unwrap

    from parity_steps import load_initial
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = build(lora_vlm("colocated_tp2", proj=LORA, vision=LORA))
    load_initial(model, initial)
    loss, norm = _sgd_step(model, synthetic_batch(model.valid, BATCH, seed=11))
    updated = {}
    for name in ("lm", "proj", "vision"):
        tp = model.pg_collection(name).tp
        updated[name] = {k: unshard(p, initial[name][k].shape, tp)
                         for k, p in adapters(unwrap(model.chunks(name)[0])).items()}
    return loss, norm, updated if dist.get_rank() == 0 else None


def test_adapters_at_tp2_take_the_step_they_take_at_tp1():
    initial, ref_loss, ref_norm, ref_updated = run_ranks(1, _tp_reference)[0]
    loss, norm, updated = run_ranks(2, _tp2_step, initial)[0]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and abs(norm - ref_norm) <= 1e-5 * ref_norm
    for name, params in ref_updated.items():
        assert params.keys() == updated[name].keys() and params
        for key, expected in params.items():
            moved = (expected - initial[name][key]).abs().max()
            assert moved > 0, (name, key)  # both A and B took a step
            diff = (updated[name][key] - expected).abs().max()
            assert diff <= 1e-5 * max(expected.abs().max(), 1e-3), (name, key, float(diff), float(moved))


def _pipelined_lora_step() -> float:
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = build(_pipelined_graph())
    optimizer = GraphOptimizer(model, OptimizerSettings(lr=1e-2))
    loss = GraphSchedule(model).forward_backward(synthetic_batch(model.valid, BATCH, seed=1), 2)
    optimizer.step(loss)
    trained = sorted(n for c in model.chunks("lm") for n, p in c.named_parameters() if p.requires_grad)
    model.close()
    return loss, trained


def _pipelined_graph():
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.document.graph import Graph

    data = mamba_lm().as_dict()
    data["nodes"]["lm"]["config"]["hybrid_layer_pattern"] = "M*|-M"  # stage 0: M*, stage 1: -M
    data["nodes"]["lm"]["placement"] = {"pp": 2}
    data["nodes"]["lm"]["lora"] = {"rank": 4, "targets": ["in_proj", "linear_fc2"]}  # fc2 on stage 1 only
    return Graph.from_dict(data)


def test_targets_on_one_pipeline_stage_only_train_there_and_the_plan_counts_them():
    from mimo_builder._internal.planning.plan import make_plan

    hidden, in_proj_out, ffn = 64, 2 * 128 + 2 * 2 * 16 + 128 // 16, 4 * 64
    node = make_plan(_pipelined_graph(), 2).nodes[0]
    assert node.stage_trainable == [4 * (hidden + in_proj_out), 4 * (hidden + in_proj_out) + 4 * (ffn + hidden)]
    (loss0, trained0), (loss1, trained1) = run_ranks(2, _pipelined_lora_step)
    assert loss0 == loss1 and loss0 > 0
    assert [n.rsplit(".", 2)[-2] for n in trained0] == ["in_proj", "in_proj"]
    assert sorted({n.rsplit(".", 2)[-2] for n in trained1}) == ["in_proj", "linear_fc2"]
