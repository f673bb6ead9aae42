"""Sampling draws from one stream per sample, keyed by its index in the batch: the same seed gives
the same answers at any microbatch count, and a prompt repeated in another row (here in the
second microbatch) is sampled afresh, not copied."""

from __future__ import annotations

import torch

from multirank import run_ranks


def _sampled():
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(mamba_lm(), seed=1).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    batch = synthetic_batch(model.valid, 4, seed=0)
    for key in batch:  # row 2 repeats row 0
        batch[key][2] = batch[key][0]
    schedule = GraphSchedule(model)
    runs = [schedule.generate(batch, 12, temperature=3.0, seed=5, num_microbatches=m) for m in (1, 2, 4)]
    model.close()
    return runs


def test_the_same_samples_at_any_microbatch_count_and_no_copies():
    one, two, four = run_ranks(1, _sampled)[0]
    assert torch.equal(one, two) and torch.equal(one, four)
    assert not torch.equal(one[0], one[2])
