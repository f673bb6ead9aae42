"""The shared distributed path (mimo_builder._internal.kinds.distributed) with real MCore modules on gloo."""

import resource

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

SEQ, VOCAB = 8, 64


def _gpt(**overrides):
    from submodels.gpt import GPTConfig

    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                  make_vocab_size_divisible_by=1, seq_length=SEQ)
    return GPTConfig(**{**fields, **overrides})


def _groups(layouts, mine=None):
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import create_process_groups

    compat.init_runtime("cpu")
    created = create_process_groups(layouts)
    rank = dist.get_rank()
    layout = mine or next(l for l in layouts if rank in l.ranks)
    return created.for_layout(layout)


def _ddp_config(**kw):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(**kw)


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(2, SEQ)
    return model(tokens, positions, None, labels=tokens).float().mean()


# --- hooks -----------------------------------------------------------------------------------

def _hooks_in_order():
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel

    from mimo_builder._internal.placement import Layout

    seen = []

    def hook(tag):
        def record(chunks):
            seen.append((tag, type(chunks[0]).__name__))
            return chunks
        return record

    pgs = _groups([Layout(0, 1)])
    config = _gpt(pre_wrap_hooks=[hook("pre1"), hook("pre2")], post_wrap_hooks=[hook("post1"), hook("post2")])
    chunks = config.make_builder().build_distributed_models(pgs, _ddp_config())
    assert isinstance(chunks[0], DistributedDataParallel) and isinstance(chunks[0].module, GPTModel)
    return seen


def test_hooks_run_in_order_pre_before_wrap_post_after():
    (seen,) = run_ranks(1, _hooks_in_order)
    assert seen == [("pre1", "GPTModel"), ("pre2", "GPTModel"),
                    ("post1", "DistributedDataParallel"), ("post2", "DistributedDataParallel")]


# --- DDP gradients ---------------------------------------------------------------------------

def _ddp_grads_mean_over_own_group():
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout

    layouts = [Layout(0, 2), Layout(2, 2)]  # two independent DP=2 groups in a world of 4
    pgs = _groups(layouts)
    seed_rng(0)
    (model,) = _gpt().make_builder().build_distributed_models(pgs, _ddp_config())
    _loss(model, seed=dist.get_rank()).backward()  # every rank sees a different batch
    params = [p for p in model.parameters()]
    local = torch.cat([p.main_grad.flatten() for p in params]).clone()
    model.finish_grad_sync()
    synced = torch.cat([p.main_grad.flatten() for p in params])
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    group = [r for l in layouts if dist.get_rank() in l.ranks for r in l.ranks]
    own_mean = torch.stack([everyone[r] for r in group]).mean(0)
    world_mean = torch.stack(everyone).mean(0)
    return (torch.allclose(synced, own_mean, rtol=1e-5, atol=1e-7),
            torch.allclose(synced, world_mean, rtol=1e-3, atol=1e-5), float(local.abs().sum()))


def test_ddp_gradients_are_the_mean_over_the_node_dp_group_only():
    for own, world, magnitude in run_ranks(4, _ddp_grads_mean_over_own_group):
        assert own and not world and magnitude > 0


# --- DP broadcast ----------------------------------------------------------------------------

def _params_after_build(random_init, wrap):
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout

    pgs = _groups([Layout(0, 2)])
    seed_rng(100 + dist.get_rank())  # replicas start different on purpose
    chunks = _gpt().make_builder().build_distributed_models(
        pgs, _ddp_config() if wrap else None, wrap_with_ddp=wrap, data_parallel_random_init=random_init)
    return torch.cat([p.detach().flatten() for p in chunks[0].parameters()])


@pytest.mark.parametrize("wrap", [True, False])
def test_data_parallel_random_init_makes_replicas_bitwise_equal(wrap):
    first, second = run_ranks(2, _params_after_build, True, wrap)
    assert torch.equal(first, second)
    first, second = run_ranks(2, _params_after_build, False, wrap)
    assert not torch.equal(first, second)  # the control: without broadcast they differ


# --- virtual pipeline chunks -----------------------------------------------------------------

def _vp_chunks():
    from mimo_builder._internal.placement import Layout

    pgs = _groups([Layout(0, 2, pp=2)])
    config = _gpt(num_layers=4, transformer={"virtual_pipeline_model_parallel_size": 2})
    chunks = config.make_builder().build_distributed_models(pgs, _ddp_config())
    return [(c.module.pre_process, c.module.post_process, len(c.module.decoder.layers)) for c in chunks]


def test_pp2_vp2_gives_two_chunks_per_rank_with_mcore_flags():
    rank0, rank1 = run_ranks(2, _vp_chunks)
    assert rank0 == [(True, False, 1), (False, False, 1)]
    assert rank1 == [(False, False, 1), (False, True, 1)]


# --- meta device -----------------------------------------------------------------------------

def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _meta_then_materialize():
    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.placement import Layout

    pgs = _groups([Layout(0, 1)])
    config = _gpt(num_layers=8, hidden_size=1024, num_attention_heads=8, vocab_size=32000,
                  transformer={"init_model_with_meta_device": True})
    builder = config.make_builder()
    # torch's meta-device init imports dynamo on first use (~44 MB of modules): not parameter memory
    torch.nn.init.normal_(torch.empty(2, device="meta"))
    before = _rss_mb()
    chunks = distributed.build_chunks(builder.build_model, builder.transformer_config(pgs), pgs)
    on_meta = _rss_mb() - before
    params = sum(p.numel() for p in chunks[0].parameters())
    all_meta = all(p.is_meta for p in chunks[0].parameters())
    model = distributed.materialize(chunks[0], torch.device("cpu"))
    for p in model.parameters():
        p.data.zero_()  # touch the pages so they count in RSS
    materialized = _rss_mb() - before
    return params, all_meta, on_meta, materialized, any(p.is_meta for p in model.parameters())


def test_meta_init_uses_no_parameter_memory_until_materialized():
    params, all_meta, on_meta, materialized, still_meta = run_ranks(1, _meta_then_materialize)[0]
    param_mb = params * 4 / 2**20
    assert all_meta and not still_meta
    assert param_mb > 300
    assert on_meta < 0.05 * param_mb, (on_meta, param_mb)
    assert materialized > 0.9 * param_mb, (materialized, param_mb)


# --- mixed precision -------------------------------------------------------------------------

def _bf16_model():
    from megatron.core.transformer.module import Float16Module

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout

    pgs = _groups([Layout(0, 1)])
    seed_rng(0)
    (chunk,) = _gpt(dtype="bf16").make_builder().build_distributed_models(pgs, _ddp_config())
    loss = _loss(chunk, seed=0)
    loss.backward()
    return (isinstance(chunk.module, Float16Module), {p.dtype for p in chunk.parameters()},
            bool(torch.isfinite(loss)))


def test_bf16_wraps_in_float16module_and_trains():
    wrapped, dtypes, finite = run_ranks(1, _bf16_model)[0]
    assert wrapped and dtypes == {torch.bfloat16} and finite


# --- refused requests ------------------------------------------------------------------------

def _fsdp_on_cpu(option):
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.placement import Layout

    pgs = _groups([Layout(0, 1)])
    try:
        _gpt().make_builder().build_distributed_models(pgs, _ddp_config(), **{option: True})
    except ConfigError as err:
        return str(err)
    return "built"


@pytest.mark.parametrize("option", ["use_megatron_fsdp", "use_torch_fsdp2"])
def test_fsdp_on_cpu_is_a_clear_error(option):
    message = run_ranks(1, _fsdp_on_cpu, option)[0]
    assert option in message and "CUDA" in message
