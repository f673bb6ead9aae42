"""MCore GPTModel (local spec) at TP=2 on HyperCommGrid groups equals the TP=1 build on CPU."""

import torch
import torch.distributed as dist

from multirank import run_ranks

SEED, VOCAB, SEQ, BATCH = 1234, 64, 12, 3


def _gpt_logits(tp: int) -> torch.Tensor:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu")
    layout = Layout(offset=0, size=dist.get_world_size(), tp=tp)
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(SEED, tp_rank=pgs.tp.rank())
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        parallel_output=False,
        pg_collection=pgs,
    )
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


def test_gpt_tp2_logits_equal_tp1():
    (reference,) = run_ranks(1, _gpt_logits, 1)
    tp2_rank0, tp2_rank1 = run_ranks(2, _gpt_logits, 2)
    assert reference.shape == (BATCH, SEQ, VOCAB)
    assert torch.equal(tp2_rank0, tp2_rank1)
    torch.testing.assert_close(tp2_rank0, reference, rtol=1e-5, atol=1e-5)
    assert reference.abs().max() > 0.1  # a real model, not zeros
