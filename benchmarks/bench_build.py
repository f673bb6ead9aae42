"""build_distributed_models of a small GPT vs the same steps written by hand with MCore calls.

Run: .venv/bin/python benchmarks/bench_build.py [--json out.json]
Reports median times of >= 5 builds each and the ratio ours / by-hand (target <= 1.02).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402


def _by_hand(config, pgs):
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mimo_builder._internal.platform.compat import seed_rng

    seed_rng(0)
    builder = config.make_builder()
    tc = builder.transformer_config(pgs)
    model = GPTModel(tc, get_gpt_layer_local_spec(), vocab_size=config.vocab_size,
                     max_sequence_length=config.seq_length, pg_collection=pgs,
                     share_embeddings_and_output_weights=True, position_embedding_type="rope")
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    ddp = DistributedDataParallelConfig(bucket_size=None)
    return [DistributedDataParallel(tc, ddp, model, pg_collection=pgs)]


def _ours(config, pgs):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng

    seed_rng(0)
    return config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())


def _measure(repeats):
    import torch.distributed as dist

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.gpt import GPTConfig

    compat.init_runtime("cpu")
    layout = Layout(0, dist.get_world_size())
    pgs = create_process_groups([layout]).for_layout(layout)
    config = GPTConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=512,
                       make_vocab_size_divisible_by=1, seq_length=64, impl="local")
    return interleaved_medians({"by_hand": lambda: _by_hand(config, pgs),
                                "ours": lambda: _ours(config, pgs)}, repeats=repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mimo_builder._internal.platform.launch import launch

    times = launch(_measure, 1, args.repeats, timeout_s=600)[0]
    ratio = times["ours"] / times["by_hand"]
    return report(
        "build_distributed_models vs MCore calls by hand (GPT, 4 layers, hidden 64, 1 rank, CPU)",
        [("by hand (median)", f"{times['by_hand'] * 1e3:.1f} ms"),
         ("build_distributed_models (median)", f"{times['ours'] * 1e3:.1f} ms")],
        "ratio ours / by hand", ratio, "<= 1.02", args.json)


if __name__ == "__main__":
    main()
