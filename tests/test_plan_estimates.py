"""Memory and FLOPs in the dry-run plan (``mimo_builder._internal.planning.estimate``), against hand counts and
against what one real build keeps.

- JSON: every rank and node carries ``memory_bytes`` with exactly the pinned keys;
- parameter, gradient and optimizer bytes of a GPT node equal counts derived by hand from its
  shape (bytes per parameter as in Megatron's distributed-optimizer table), and the distributed
  optimizer gives each of 4 DP ranks a quarter of the optimizer state;
- ``--gpu-memory`` flags a rank that cannot fit and passes one that fits; a bad size exits 2;
- FLOPs of a one-layer GPT are 3 x (2 x params x tokens + 4 s^2 h) within 2%; a lopsided
  placement and idle ranks are warned about with their numbers;
- full recomputation keeps each layer's input and repeats the forward; a pp=2 rank keeps as many
  microbatches as 1F1B has in flight on it;
- measured on one real rank (bf16, Adam, MCore DDP): parameter, gradient and optimizer bytes
  within 1% of the estimate, and the bytes autograd keeps for backward (unique storages that are
  not parameters) within ACTIVATION_TOLERANCE of each node kind's estimate.
"""

from __future__ import annotations

import json
import math

import pytest

from mimo_builder.cli import main
from mimo_builder._internal.planning.estimate import MEMORY_KEYS, estimate_plan, parse_bytes
from mimo_builder._internal.document.graph import Graph, Placement
from mimo_builder._internal.planning.plan import make_plan
from mimo_builder._internal.planning.table import pipeline_plan

H, HEADS, FFN, SEQ, VOCAB = 64, 4, 256, 128, 256
BATCH = 2
# Largest relative error of the activation estimate against the measured bytes, any node kind.
# Measured (one rank, batch 2, bf16; GPT fp32): vision -0.1%, projectors 0.0%, audio 0.0%,
# Mamba hybrid (M*-M) -0.7%, GPT -1.8%.
ACTIVATION_TOLERANCE = 0.05
STATE_TOLERANCE = 0.01  # params / grads / optimizer: padding and Adam's step counters


def _gpt(num_layers=2, **extra):
    from submodels.gpt import GPTConfig

    return GPTConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                     vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_length=SEQ, **extra)


def _gpt_graph(placement=None, ddp=None, **config) -> Graph:
    return (Graph().add("gpt", _gpt(**config), placement=placement or Placement(), ddp=ddp)
            .bind("input_ids", "gpt.input_ids").bind("labels", "gpt.labels").output("gpt.loss"))


def _estimates(graph, world_size, microbatches=1, micro_batch_size=1, gpu_memory=None):
    plan = make_plan(graph, world_size)
    return plan, estimate_plan(plan, pipeline_plan(plan, microbatches), micro_batch_size, gpu_memory)


def _gpt_params(num_layers: int) -> int:
    """GPTModel (local spec, rope, tied output layer) by hand: embedding, per layer two LayerNorms
    (weight + bias), QKV, projection, fc1, fc2 with biases, and the final LayerNorm."""
    layer = 2 * (2 * H) + (H * 3 * H + 3 * H) + (H * H + H) + (H * FFN + FFN) + (FFN * H + H)
    return VOCAB * H + num_layers * layer + 2 * H


def _cli_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- JSON, state bytes, fit ----------------------------------------------------------------------

def test_json_carries_memory_and_flops_per_rank_and_node(capsys):
    data = _cli_json(capsys, "graphs/vlm.yaml", "--world-size", "4", "--gpu-memory", "80GB")
    for entry in data["ranks"] + data["nodes"]:
        assert tuple(entry["memory_bytes"]) == MEMORY_KEYS
        memory = entry["memory_bytes"]
        assert memory["total"] == sum(memory[k] for k in MEMORY_KEYS[:-1]) > 0
        assert entry["flops_per_step"] > 0
    assert all(rank["fits"] is True for rank in data["ranks"])
    assert data["estimates"]["gpu_memory_bytes"] == 80 * 10**9
    assert isinstance(data["warnings"], list)


@pytest.mark.parametrize("grad_fp32, grad_bytes, optimizer_bytes", [(False, 2, 16), (True, 4, 12)])
def test_state_bytes_of_a_bf16_gpt_match_the_hand_count(grad_fp32, grad_bytes, optimizer_bytes):
    # bf16 parameters (2 bytes); Adam: two fp32 moments + fp32 masters (12), plus the fp32 copy of
    # bf16 gradients (4) unless DDP already reduces in fp32: Megatron's 20 and 18 bytes per parameter.
    _, est = _estimates(_gpt_graph(ddp={"grad_reduce_in_fp32": grad_fp32}, dtype="bf16"), 1)
    params = _gpt_params(2)
    memory = est.memory[0]
    assert (memory.params, memory.grads, memory.optimizer) == (2 * params, grad_bytes * params,
                                                                optimizer_bytes * params)


def test_distributed_optimizer_gives_each_of_four_dp_ranks_a_quarter():
    _, plain = _estimates(_gpt_graph(dtype="bf16"), 4)
    _, sharded = _estimates(_gpt_graph(ddp={"use_distributed_optimizer": True}, dtype="bf16"), 4)
    for rank in range(4):
        assert sharded.memory[rank].optimizer * 4 == plain.memory[rank].optimizer == 16 * _gpt_params(2)
        assert sharded.memory[rank].params == plain.memory[rank].params
        assert sharded.memory[rank].grads == plain.memory[rank].grads


def test_gpu_memory_flags_the_rank_that_does_not_fit(capsys, tmp_path):
    doc = tmp_path / "gpt.json"
    doc.write_text(_gpt_graph(dtype="bf16").to_json())
    tight = _cli_json(capsys, str(doc), "--world-size", "1", "--gpu-memory", "1MB")
    roomy = _cli_json(capsys, str(doc), "--world-size", "1", "--gpu-memory", "80GiB")
    assert tight["ranks"][0]["fits"] is False and roomy["ranks"][0]["fits"] is True
    assert any(w.startswith("1 ranks do not fit in 1MB: 0 (") for w in tight["warnings"])
    assert not any("do not fit" in w for w in roomy["warnings"])
    assert main(["plan", str(doc), "--world-size", "1", "--gpu-memory", "1MB"]) == 0
    table = capsys.readouterr().out
    assert "NO" in table and "1 ranks do not fit in 1MB" in table


@pytest.mark.parametrize("size", ["lots", "0GB", "-5GB", "80XB", "nan"])
def test_a_bad_gpu_memory_size_exits_2(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "graphs/vlm.yaml", "--world-size", "4", "--gpu-memory", size])
    assert exit_info.value.code == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_memory_sizes_parse_in_decimal_and_binary_units():
    assert [parse_bytes(t) for t in ("80GB", "80 GiB", "512MB", "80e9", "1kib")] == [
        80 * 10**9, 80 * 2**30, 512 * 10**6, 80 * 10**9, 1024]


# --- FLOPs and balance ---------------------------------------------------------------------------

def test_flops_of_a_one_layer_gpt_are_six_params_per_token_plus_attention():
    plan, est = _estimates(_gpt_graph(num_layers=1), 1, micro_batch_size=BATCH)
    tokens = BATCH * SEQ
    # 2 x params per token (the tied embedding counted once: it is the logits' matmul) plus the
    # attention scores and their use on values (2 x 2 x s^2 x h per sample); backward twice that.
    # Biases and norm weights (1.5% of this tiny model's parameters) do no matmul: 2% tolerance.
    expected = 3 * (2 * plan.nodes[0].params * tokens + 4 * SEQ * SEQ * H * BATCH)
    assert est.nodes["gpt"].flops_per_step == pytest.approx(expected, rel=0.02)
    assert est.flops[0] == est.nodes["gpt"].flops_per_step  # one rank does it all


def test_a_lopsided_placement_and_idle_ranks_are_warned_about():
    from graphs.vlm import vlm

    _, lopsided = _estimates(vlm("disjoint4"), 8)
    by_rank = {r: lopsided.flops[r] for r in range(8)}
    assert by_rank[2] > 2 * by_rank[0] > 0 and by_rank[4] == 0
    text = " | ".join(lopsided.warnings)
    assert "4 of 8 ranks host no node and idle every step: 4-7" in text
    assert "unbalanced placement: ranks 2-3 do" in text and "ranks 0-1" in text
    assert lopsided.imbalance == pytest.approx(by_rank[2] / ((2 * by_rank[0] + 2 * by_rank[2]) / 4))
    _, colocated = _estimates(vlm("colocated_dp2"), 2)
    assert colocated.warnings == [] and colocated.imbalance == 1.0


def test_full_recomputation_keeps_each_layer_input_and_repeats_the_forward():
    def gpt(layers, **transformer):
        return _estimates(_gpt_graph(num_layers=layers, transformer=transformer), 1,
                          micro_batch_size=BATCH)[1].nodes["gpt"]

    two, four = gpt(2), gpt(4)
    full = gpt(4, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    layer = (four.stages[0].activation_bytes - two.stages[0].activation_bytes) // 2
    rest = four.stages[0].activation_bytes - 4 * layer  # embedding, final norm, logits
    layer_input = SEQ * BATCH * H * 4  # fp32 hidden states
    # every layer keeps its input; one layer is rebuilt at a time during the backward
    assert full.stages[0].activation_bytes == 4 * layer_input + layer + rest
    layer_forward = (four.flops_per_step - two.flops_per_step) // 2 // 3
    assert full.flops_per_step == four.flops_per_step + 4 * layer_forward  # 4x the layers' forward


def test_activations_follow_the_microbatches_in_flight_on_each_pipeline_rank():
    from graphs.mamba_lm import graph

    pp2 = graph.model_copy(deep=True)
    pp2.nodes["lm"].placement = Placement(pp=2)
    plan, est = _estimates(pp2, 2, microbatches=4)
    stages = est.nodes["lm"].stages
    # 1F1B: pipeline rank p runs pp - p forwards before its first backward
    assert est.memory[0].activations == 2 * stages[0].activation_bytes
    assert est.memory[1].activations == 1 * stages[1].activation_bytes


# --- measured on a real build --------------------------------------------------------------------

def _measured_graph(impl: str = "auto") -> Graph:
    from graphs.avlm import avlm

    graph = avlm("single")
    graph.add("gpt", _gpt(), placement=Placement())  # fp32: no master weights, one softmax copy
    graph.bind("gpt_ids", "gpt.input_ids").bind("gpt_labels", "gpt.labels")
    for name, node in graph.nodes.items():
        node.config["dtype"] = "fp32" if name == "gpt" else "bf16"
        if not name.endswith("proj"):
            node.config["impl"] = impl
    graph.nodes["lm"].ddp["grad_reduce_in_fp32"] = True
    return graph


@pytest.mark.parametrize("impl", ["auto", "sdpa"])
def test_estimates_match_what_a_real_build_keeps(impl):
    """``auto`` builds MCore's local attention here (s^2 probabilities kept); ``sdpa`` torch's
    flash kernel (output and softmax statistics)."""
    from multirank import run_ranks

    graph = _measured_graph(impl)
    plan, est = _estimates(graph, 1, micro_batch_size=BATCH)
    tokens = {name: node.tokens for name, node in est.nodes.items()}
    assert tokens == {"vision": 17, "vision_proj": 17, "audio": 32, "audio_proj": 32, "lm": 128, "gpt": SEQ}
    (measured,) = run_ranks(1, _measure, graph, tokens)
    errors = {}
    for name, got in measured.items():
        expected = est.node_memory[0][name]
        for key in ("params", "grads", "optimizer"):
            assert getattr(expected, key) == pytest.approx(got[key], rel=STATE_TOLERANCE), (name, key)
        single = est.nodes[name].stages[0].activation_bytes
        errors[name] = single / got["activations"] - 1
    print("activation estimate vs measured:", {k: f"{v:+.1%}" for k, v in errors.items()})
    assert all(abs(e) <= ACTIVATION_TOLERANCE for e in errors.values()), errors


def _measure(graph, tokens):
    """On one rank: build, run each node's forward counting what autograd keeps, backward, one
    optimizer step; bytes of parameters, gradient buffers, optimizer state and activations."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    # MCore's fused activations compiled, as on a GPU: run eagerly they keep their intermediates
    compat.init_runtime("cpu", skip=("compiled_fusions_eager",))
    (model,) = CompositeBuilder(graph, seed=0).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    params = {p.untyped_storage().data_ptr() for n in model.valid.order for c in model.chunks(n)
              for p in c.parameters()}
    out = {}
    for name, inputs in _node_inputs(tokens).items():
        if name not in model.valid.order:
            continue
        saved = _SavedBytes(params)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), _gpu_kernel_saves(saved):
            result = _forward(model, name, inputs)
        result.float().sum().backward()
        out[name] = {"activations": saved.total()}
    optimizer = GraphOptimizer(model)
    optimizer.step()
    for name in out:
        chunk = model.chunks(name)[0]
        buffers = list(chunk.buffers) + list(chunk.expert_parallel_buffers)
        grad_storages = {b.grad_data.untyped_storage().data_ptr() for b in buffers}
        out[name]["params"] = sum(p.numel() * p.element_size() for p in chunk.parameters())
        out[name]["grads"] = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
        state = _SavedBytes(params | grad_storages)
        for part in optimizer.nodes[name].parts():
            for group in part.optimizer.param_groups:
                for p in group["params"]:
                    state.keep(p, p.grad, *part.optimizer.state.get(p, {}).values())
        out[name]["optimizer"] = state.total()
    return out


def _node_inputs(tokens) -> dict[str, dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ + 1), generator=g)  # above the placeholder ids 1, 2
    text = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return {
        "vision": {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g)},
        "vision_proj": {"input": torch.randn(BATCH, tokens["vision_proj"], H, generator=g).requires_grad_()},
        "audio": {"features": torch.randn(BATCH, 2 * tokens["audio"], 16, generator=g)},
        "audio_proj": {"input": torch.randn(BATCH, tokens["audio_proj"], H, generator=g).requires_grad_()},
        "lm": text,
        "gpt": text,
    }


def _forward(model, name, inputs):
    chunk, builder = model.chunks(name)[0], model.valid.builders[name]
    outputs = builder.run_stage(chunk, inputs, None, first=True, last=True)
    return next(iter(outputs.values()))


class _SavedBytes:
    """Unique storages kept for backward (parameters and ``exclude`` left out), and extra bytes
    counted for tensors a GPU kernel would keep."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages, self.extra, self.alive = exclude, {}, 0, []

    def keep(self, *tensors):
        """Count each tensor's storage once; hold it as a kernel's saved tensors would be held
        (else a freed storage's address comes back for another tensor)."""
        import torch

        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.exclude:
                    self.storages[storage.data_ptr()] = storage.nbytes()
                    self.alive.append(t)

    def pack(self, tensor):
        self.keep(tensor)
        return tensor

    def total(self) -> int:
        return sum(self.storages.values()) + self.extra


def _gpu_kernel_saves(saved: _SavedBytes):
    """The Mamba mixer's kernels run as the CPU stand-ins (which keep their intermediates for
    autograd); count instead what mamba-ssm's and causal-conv1d's autograd functions keep: the
    fused conv + scan's input zxBCdt and its ungated output (MCore's training path); the scan's
    x, dt, B, C, output and fp32 dA_cumsum; the conv's input; the gated norm's x, z and fp32
    rstd. Everything else in the layer is measured as it runs."""
    import contextlib
    import sys
    from unittest import mock

    import torch

    mixer = sys.modules["megatron.core.ssm.mamba_mixer"]
    norm = sys.modules["mamba_ssm.ops.triton.layernorm_gated"]
    scan_fn, conv_fn, norm_fn = mixer.mamba_chunk_scan_combined, mixer.causal_conv1d_fn, norm.rmsnorm_fn
    split_fn = mixer.mamba_split_conv1d_scan_combined

    def uncounted(fn, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return fn(*args, **kwargs)

    def scan(x, dt, A, B, C, chunk_size, *args, **kwargs):
        y = uncounted(scan_fn, x, dt, A, B, C, chunk_size, *args, **kwargs)
        saved.keep(y if torch.is_tensor(y) else y[0], x, dt, B, C, kwargs.get("z"))
        batch, length, heads = dt.shape
        saved.extra += batch * heads * math.ceil(length / chunk_size) * chunk_size * 4
        return y

    def split(zxbcdt, *args, **kwargs):
        y = uncounted(split_fn, zxbcdt, *args, **kwargs)
        out = y if torch.is_tensor(y) else y[0]
        saved.keep(zxbcdt)
        saved.extra += out.numel() * out.element_size()  # the scan's output before the gate
        return y

    def conv(x, *args, **kwargs):
        saved.keep(x)
        return uncounted(conv_fn, x, *args, **kwargs)

    def gated_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        saved.keep(x, z)
        groups = x.shape[-1] // (group_size or x.shape[-1])
        saved.extra += x.numel() // x.shape[-1] * groups * 4
        return uncounted(norm_fn, x, weight, bias, z=z, eps=eps, group_size=group_size,
                         norm_before_gate=norm_before_gate)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(mixer, "mamba_chunk_scan_combined", scan))
    stack.enter_context(mock.patch.object(mixer, "causal_conv1d_fn", conv))
    stack.enter_context(mock.patch.object(mixer, "mamba_split_conv1d_scan_combined", split))
    stack.enter_context(mock.patch.object(norm, "rmsnorm_fn", gated_norm))
    return stack
