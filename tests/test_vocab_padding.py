"""A padded vocabulary (``make_vocab_size_divisible_by``) never shows: ``lm.logits`` has
``vocab_size`` columns at tp=1, greedy predictions (``correct``) take their argmax over the real
vocabulary, and generation never picks a padding id or a modality placeholder."""

from __future__ import annotations

import torch

from multirank import run_ranks


def test_greedy_predictions_skip_padding_columns():
    from submodels.lm_metrics import greedy_predictions

    logits = torch.tensor([[[0.0, 1.0, 2.0, 1.5, 9.0, 8.0]]])  # columns 4 and 5 are padding
    assert greedy_predictions(logits, None, vocab_size=4).tolist() == [[2]]
    assert greedy_predictions(logits, None).tolist() == [[4]]  # without the size: the padding would win


def test_generation_never_picks_a_placeholder():
    from mimo_builder._internal.runtime.generation import GenerationOptions
    from submodels.mamba_generate import _Picker

    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5, 7.0]])
    greedy = _Picker(GenerationOptions(4), vocab_size=4, banned=[1])
    assert greedy(logits).tolist() == [2]  # not 4 (padding), not 1 (the image placeholder)
    sampled = _Picker(GenerationOptions(4, temperature=5.0, seed=3), vocab_size=4, banned=[1])
    assert 1 not in {int(sampled(logits)) for _ in range(200)}


def _logits_width() -> int:
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    graph = mamba_lm()
    graph.nodes["lm"].config = {**graph.nodes["lm"].config, "make_vocab_size_divisible_by": 128, "vocab_size": 200}
    for key in ("labels", "loss_mask"):
        graph.inputs.pop(key, None)
    graph.outputs = ["lm.logits"]
    (model,) = CompositeBuilder(graph, seed=1).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    logits = GraphSchedule(model).evaluate(synthetic_batch(model.valid, 2, seed=0), outputs=["lm.logits"])["lm.logits"]
    model.close()
    return logits.shape[-1]


def test_logits_have_vocab_size_columns_at_tp1():
    assert run_ranks(1, _logits_width) == [200]  # the model holds 256 columns
