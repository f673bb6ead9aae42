"""Mamba backbone: MCore HybridModel on CPU, TP/PP placement, training, validation, real sizes."""

import resource
import time

import pytest
import torch
import torch.distributed as dist

from mimo_builder._internal.errors import ConfigError
from multirank import run_ranks

SEQ, VOCAB = 16, 64
SMALL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, hybrid_layer_pattern="M*-M",
             vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_length=SEQ, mamba_state_dim=16,
             mamba_head_dim=8, mamba_num_groups=2, position_embedding_type="rope")


def _config(**overrides):
    from submodels.mamba import MambaConfig

    return MambaConfig(**{**SMALL, **overrides})


def _groups(layouts):
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import create_process_groups

    compat.init_runtime("cpu")
    return create_process_groups(layouts)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    return tokens, torch.arange(SEQ).expand(2, SEQ)


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


# --- TP=2 equals TP=1 from the same master weights ----------------------------------------

def _tp2_vs_tp1():
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout
    from mimo_builder._internal.assembly.tp_shard import load_full_state
    from submodels import mamba_cpu

    rank = dist.get_rank()
    solo, pair = Layout(rank, 1), Layout(0, 2, tp=2)
    created = _groups([Layout(0, 1), Layout(1, 1), pair])
    builder = _config().make_builder()
    seed_rng(0)
    (reference,) = builder.build_distributed_models(created.for_layout(solo), DistributedDataParallelConfig())
    pgs = created.for_layout(pair)
    seed_rng(1, tp_rank=pgs.tp.rank())  # deliberately different init, then overwritten
    (sharded,) = builder.build_distributed_models(pgs, DistributedDataParallelConfig())
    full = {n: p.detach() for n, p in _unwrap(reference).named_parameters()}
    load_full_state(_unwrap(sharded), full, pgs.tp.rank(), 2)
    tokens, positions = _batch()
    with torch.no_grad():
        expected = reference(tokens, positions, None)
        local = sharded(tokens, positions, None)  # vocab-parallel logits [b, s, v / tp]
    width = local.shape[-1]
    expected = expected[..., rank * width:(rank + 1) * width]
    return float((local - expected).abs().max()), float(expected.abs().max()), mamba_cpu.cpu_kernels_installed()


def test_tp2_logits_equal_tp1_from_same_master_weights():
    for max_diff, scale, kernels in run_ranks(2, _tp2_vs_tp1):
        assert kernels  # MCore's MambaMixer ran on the pure-torch CPU kernels
        assert scale > 0.1
        assert max_diff <= 1e-5 * max(1.0, scale), max_diff


# --- pipeline stages from '|' -----------------------------------------------------------------

def _pp_stages():
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout

    layout = Layout(0, 2, pp=2)
    pgs = _groups([layout]).for_layout(layout)
    seed_rng(0)
    config = _config(hybrid_layer_pattern="M*|-M")
    (chunk,) = config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
    model = _unwrap(chunk)
    return model.pre_process, model.post_process, [type(l).__name__ for l in model.decoder.layers]


def test_pipe_pattern_at_pp2_gives_each_stage_its_layers_and_flags():
    first, last = run_ranks(2, _pp_stages)
    assert first == (True, False, ["MambaLayer", "TransformerLayer"])
    assert last == (False, True, ["MLPLayer", "MambaLayer"])


# --- training lowers the loss -----------------------------------------------------------------

def _train_steps(steps):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout

    layout = Layout(0, 1)
    pgs = _groups([layout]).for_layout(layout)
    seed_rng(0)
    (model,) = _config().make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
    params = [p for p in model.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    tokens, positions = _batch()
    losses = []
    for _ in range(steps):
        model.zero_grad_buffer()
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        model.finish_grad_sync()
        for p in params:
            p.grad = p.main_grad
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_a_few_steps_on_a_repeated_batch_lower_the_loss():
    (losses,) = run_ranks(1, _train_steps, 8)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(hybrid_layer_pattern="M*X-"), "unknown symbol"),
    (dict(hybrid_layer_pattern="M*-"), "has 3 layers but num_layers is 4"),
    (dict(hidden_size=30), "not divisible by num_attention_heads"),
    (dict(hybrid_layer_pattern="M*EM"), "num_experts is not set"),
    (dict(mamba_num_groups=3), "not divisible by mamba_num_groups"),
])
def test_config_errors_name_the_field(overrides, message):
    from mimo_builder._internal.kinds.config import ModelConfig

    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"builder": "mamba", **SMALL, **overrides})


def test_tp_problems_name_heads_and_mamba_heads():
    problems = _config(num_attention_heads=2, hidden_size=32, mamba_num_groups=1).tp_problems(4)
    assert any("num_attention_heads 2" in p for p in problems)
    assert any("mamba_num_groups 1" in p for p in problems)
    assert any("Mamba heads 8" in p for p in _config(mamba_head_dim=8).tp_problems(16))
    assert _config().tp_problems(2) == []
    # a pattern without attention still needs heads MCore's TransformerConfig can split
    only_mamba = _config(hybrid_layer_pattern="MM", num_layers=2, num_attention_heads=1).tp_problems(2)
    assert len(only_mamba) == 2 and "num_attention_heads 1 is not divisible by tp 2" in only_mamba[0]
    assert "even without attention layers" in only_mamba[0]


def test_pp_problems_compare_pipe_stages_with_pp():
    assert "2 '|'-separated stages but pp*vp = 4*1" in _config(hybrid_layer_pattern="M*|-M").pp_problems(4)[0]
    assert _config(hybrid_layer_pattern="M*|-M").pp_problems(2) == []
    assert "not divisible by pp*vp = 3" in _config().pp_problems(3)[0]


# --- real sizes on the meta device -----------------------------------------------------------

def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _meta_build(preset_name):
    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout
    from submodels import mamba_presets

    layout = Layout(0, 1)
    pgs = _groups([layout]).for_layout(layout)
    seed_rng(0)
    config = getattr(mamba_presets, preset_name)(transformer={"init_model_with_meta_device": True,
                                                      **getattr(mamba_presets, preset_name)().transformer})
    before, start = _rss_mb(), time.perf_counter()
    builder = config.make_builder()
    (chunk,) = distributed.build_chunks(builder.build_model, builder.transformer_config(pgs), pgs)
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in chunk.parameters())
    return count, seconds, _rss_mb() - before, all(p.is_meta for p in chunk.parameters())


def _mamba2_params(d_model, n_layer, vocab, d_state, headdim, ngroups, d_conv=4, expand=2):
    """Mamba-2 LM parameter count from its architecture, tied embeddings."""
    d_inner, nheads = expand * d_model, expand * d_model // headdim
    in_proj = d_model * (2 * d_inner + 2 * ngroups * d_state + nheads)
    conv_dim = d_inner + 2 * ngroups * d_state
    conv = conv_dim * d_conv + conv_dim
    layer = in_proj + conv + 3 * nheads + d_inner + d_inner * d_model + d_model  # dt/A/D, norm, out, pre-norm
    return vocab * d_model + n_layer * layer + d_model


def test_mamba2_2p7b_builds_on_meta_with_the_published_size():
    count, seconds, rss_mb, meta = run_ranks(1, _meta_build, "mamba2_2p7b")[0]
    # state-spaces/mamba2-2.7b: vocab 50277 padded to 50288 (multiple of 16), tied embeddings.
    assert count == _mamba2_params(2560, 64, 50288, 128, 64, 1) == 2_702_599_680
    assert meta and seconds < 10 and rss_mb < 500, (seconds, rss_mb)


def test_nemotron_h_8b_builds_on_meta_with_the_published_size():
    count, seconds, rss_mb, meta = run_ranks(1, _meta_build, "nemotron_h_8b")[0]
    h, vocab = 4096, 131072
    mamba = _mamba2_params(h, 1, 0, 128, 64, 8) - h  # one Mamba layer (no embedding, no final norm)
    attention = h * (32 * 128 + 2 * 8 * 128) + 32 * 128 * h + h
    mlp = 2 * h * 21504 + h
    expected = 2 * vocab * h + 24 * mamba + 4 * attention + 24 * mlp + h  # untied output layer
    # nvidia/Nemotron-H-8B-Base-8K reports 8,100,852,736 parameters.
    assert count == expected == 8_100_852_736
    assert meta and seconds < 10 and rss_mb < 500, (seconds, rss_mb)
