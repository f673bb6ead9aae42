"""Sequence packing: real tokens per second, packed vs one sample per row, on long-tailed lengths.

The vlm graph on one rank (vision encoder -> projector -> hybrid Mamba backbone ``M*-M``, its
``seq_length`` raised to 256), fed by the project's collator: each sample an image and a text
whose length follows a long tail (log-normal, median 40 bytes by default, clipped to the row). Padded, each
sample fills a row of 256 (what the collator does); packed (``Graph.packed()``, the same samples
and the same model), the backbone lays them several to a row. Each measurement is a training step
(forward, backward, Adam) over the same batches, the two modes measured in alternation. Real
tokens per second = the samples' own tokens over the step time. Target: packed / padded >= 1.5
where padding is >= 40% of the padded tokens.

Run: .venv/bin/python benchmarks/bench_packing.py [--json out.json] [--batches 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

SEQ_LENGTH, BATCH = 256, 32


def _graph(packed: bool):
    from graphs.vlm import vlm
    from mimo_builder._internal.data.tokenizer import ByteTokenizer

    graph = vlm("single")
    graph.nodes["lm"].config.update(seq_length=SEQ_LENGTH, vocab_size=ByteTokenizer().vocab_size)
    return graph.packed() if packed else graph


def _samples(count: int, seed: int, median: int) -> list[dict]:
    """Images with texts of long-tailed lengths (log-normal around ``median`` bytes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.9, count).astype(int), 2, SEQ_LENGTH - 24)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    return [{"pixel_values": rng.standard_normal((3, 32, 32)).astype("float32"),
             "prompt": "<image>", "answer": bytes(rng.choice(letters, n)).decode()} for n in lengths]


def _measure(num_batches: int, repeats: int, median: int) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    compat.init_runtime("cpu")
    steps, tokens = {}, 0
    for mode in ("padded", "packed"):
        (model,) = CompositeBuilder(_graph(mode == "packed"), seed=1).build_distributed_models(
            ddp_config=DistributedDataParallelConfig())
        collate = GraphCollator(model.valid, ByteTokenizer(), pack=mode == "packed")
        batches = [collate(_samples(BATCH, seed, median)) for seed in range(num_batches)]
        schedule, optimizer = GraphSchedule(model), GraphOptimizer(model, OptimizerSettings())

        def train(batches=batches, schedule=schedule, optimizer=optimizer):
            for batch in batches:
                optimizer.zero_grad()
                optimizer.step(schedule.forward_backward(batch))

        steps[mode] = train
        if mode == "packed":
            tokens = sum(int(b["seq_lengths"].sum()) for b in batches)
    seconds = interleaved_medians(steps, repeats=repeats)
    return {"seconds": seconds, "tokens": tokens, "slots": num_batches * BATCH * SEQ_LENGTH}


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--median", type=int, default=40, help="median text bytes per sample (default 40)")
    args = parser.parse_args(argv)
    (result,) = launch(_measure, 1, args.batches, args.repeats, args.median, timeout_s=1800)
    seconds, tokens = result["seconds"], result["tokens"]
    rates = {mode: tokens / s for mode, s in seconds.items()}
    padding = 1 - tokens / result["slots"]
    ratio = rates["packed"] / rates["padded"]
    rows = [("samples per step, steps, median text bytes", f"{BATCH}, {args.batches}, {args.median}"),
            ("padding share of the padded rows", f"{padding:.1%}"),
            ("padded: seconds for the steps, real tokens/s", f"{seconds['padded']:.3f}, {rates['padded']:,.0f}"),
            ("packed: seconds for the steps, real tokens/s", f"{seconds['packed']:.3f}, {rates['packed']:,.0f}")]
    out = report(f"Sequence packing, vlm graph on one rank (seq_length {SEQ_LENGTH}, long-tailed lengths)", rows,
                 "packed / padded real tokens/s", ratio, ">= 1.5 with >= 40% padding", args.json)
    print(f"packed/padded tokens/s = {ratio:.2f}")
    return out


if __name__ == "__main__":
    main()
