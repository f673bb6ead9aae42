"""Forward+backward time per token of a small HybridModel ("M*-M") on CPU, against an
attention-only HybridModel ("*-*-") of the same width and depth measured in the same run.

Run: .venv/bin/python benchmarks/bench_hybrid.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from common import interleaved_medians, report  # noqa: E402

BATCH, SEQ, VOCAB = 4, 256, 512


def _model(pattern):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.mamba import MambaConfig

    layout = Layout(0, 1)
    pgs = create_process_groups([layout]).for_layout(layout)
    seed_rng(0)
    config = MambaConfig(num_layers=len(pattern), hidden_size=64, num_attention_heads=4,
                         hybrid_layer_pattern=pattern, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                         seq_length=SEQ, mamba_state_dim=32, mamba_head_dim=16, mamba_num_groups=2,
                         position_embedding_type="rope")
    (model,) = config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
    return model


def _step(model, tokens, positions):
    def run():
        model.zero_grad_buffer()
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        return loss
    return run


def _measure(repeats):
    import torch

    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return interleaved_medians({"hybrid": _step(_model("M*-M"), tokens, positions),
                                "attention": _step(_model("*-*-"), tokens, positions)}, repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from mimo_builder._internal.platform.launch import launch

    times = launch(_measure, 1, args.repeats, timeout_s=900)[0]
    tokens = BATCH * SEQ
    return report(
        f"HybridModel forward+backward on CPU (hidden 64, 4 layers, batch {BATCH} x seq {SEQ})",
        [('"M*-M" per token', f"{times['hybrid'] / tokens * 1e6:.1f} us"),
         ('"*-*-" per token (baseline)', f"{times['attention'] / tokens * 1e6:.1f} us")],
        "ratio hybrid / attention-only", times["hybrid"] / times["attention"], "informational", args.json)


if __name__ == "__main__":
    main()
