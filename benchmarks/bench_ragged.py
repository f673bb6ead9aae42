"""Encoder load balance on ragged data: balanced vs by-sample step time, in one run.

A long-tailed mix like instruction-tuning data: a third of the samples text-only, the rest with
1 to 12 images (most with one or two), each image 32, 64 or 96 px. A ViT (patch 8, positions
interpolated) encodes them at DP 2 beside a small Mamba backbone on the same 2 gloo ranks; a
projector merges 16 tokens into one. Each rank's time in the vision node's forward and backward
is shown too: by sample they differ by the shards' image counts, balanced they match. By sample, each DP rank encodes its own samples' images, so
the rank that drew the 12-image sample works while the other waits; balanced (the default,
``balance_items``), each microbatch's images are spread by cost. The two graphs are built side
by side from one seed and alternated (order reversed every round, a barrier before each step)
over the same batches; a step takes as long as its slower rank; medians over rounds of the sum
over batches. The losses of the two must agree (the same arithmetic on other ranks).

Run: .venv/bin/python benchmarks/bench_ragged.py [--json out.json] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import report  # noqa: E402

WORLD, M, BATCH, BATCHES = 2, 2, 8, 8
SIZES = (32, 64, 96)
COUNTS = (0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4, 6, 12)  # images per sample, drawn uniformly from these


def ragged_graph(balanced: bool):
    """vision (up to 96 px) -> projector (16 tokens into 1) -> backbone, all on both ranks (dp 2)."""
    from mimo_builder._internal.document.graph import Graph
    from submodels import MambaConfig, ProjectorConfig, VisionConfig

    vision = VisionConfig(num_layers=4, hidden_size=192, num_attention_heads=4, image_size=64, patch_size=8,
                          max_image_size=96, class_token=False)
    projector = ProjectorConfig(input_size=192, output_size=64, ffn_hidden_size=128, token_reduction=16)
    lm = MambaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hybrid_layer_pattern="M*",
                     vocab_size=260, make_vocab_size_divisible_by=1, seq_length=160, position_embedding_type="rope",
                     mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, modality_token_ids={"image": 1})
    graph = (Graph().add("vision", vision).add("proj", projector).add("lm", lm)
             .connect("vision.embeddings", "proj.input").connect("proj.output", "lm.image")
             .bind("pixel_values", "vision.pixel_values").bind("input_ids", "lm.input_ids")
             .bind("labels", "lm.labels").bind("loss_mask", "lm.loss_mask").output("lm.loss"))
    graph.nodes["vision"].balance_items = balanced
    return graph


def ragged_samples(seed: int) -> list[dict]:
    """One batch of the long-tailed mix."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(BATCH):
        count = COUNTS[int(torch.randint(len(COUNTS), (1,), generator=generator))]
        images = []
        for _ in range(count):
            size = SIZES[int(torch.randint(len(SIZES), (1,), generator=generator))]
            images.append(torch.randn(3, size, size, generator=generator))
        sample = {"prompt": "<image>" * count + " describe:", "answer": "a picture"}
        if images:
            sample["pixel_values"] = images
        samples.append(sample)
    return samples


def _measure(rounds: int) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig

    from bench_pipeline import _rounds
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.timing import PhaseTimer

    compat.init_runtime("cpu")
    fns, losses, items, timers = {}, {}, [], {}
    for balanced in (True, False):
        (model,) = CompositeBuilder(ragged_graph(balanced), seed=0).build_distributed_models(
            ddp_config=DistributedDataParallelConfig())
        collate = GraphCollator(model.valid, ByteTokenizer())
        batches = [collate(ragged_samples(seed)) for seed in range(BATCHES)]
        items = [b["pixel_values"].counts for b in batches]
        key = "balanced" if balanced else "by sample"
        schedule = GraphSchedule(model, timer=timers.setdefault(key, PhaseTimer()))
        losses[key] = [schedule.evaluate(b, M)["lm.loss"] for b in batches]
        fns[key] = lambda s=schedule, bs=batches: [s.forward_backward(b, M) for b in bs]
    for timer in timers.values():
        timer.take()
    times = _rounds(fns, rounds)
    vision = {key: sum(v for (node, phase), v in t.take().items() if node == "vision" and phase in ("forward", "backward"))
              for key, t in timers.items()}
    return {"times": times, "losses": losses, "items": items, "vision": vision}


def main(argv=None) -> dict:
    from mimo_builder._internal.platform.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = launch(_measure, WORLD, args.rounds, timeout_s=1200)
    step = {key: statistics.median(map(max, zip(*(r["times"][key] for r in results))))
            for key in ("balanced", "by sample")}
    losses = results[0]["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["balanced"], losses["by sample"]))
    ratio = step["balanced"] / step["by sample"]
    per_round = {key: list(map(max, zip(*(r["times"][key] for r in results)))) for key in step}
    paired = sorted(b / s for b, s in zip(per_round["balanced"], per_round["by sample"]))
    per_shard = [[sum(c[i:i + BATCH // (M * WORLD)]) for i in range(0, BATCH, BATCH // (M * WORLD))]
                 for c in results[0]["items"]]
    rows = [("mix", f"{BATCH} samples per batch, images per sample from {COUNTS}, sizes {SIZES} px"),
            ("images per DP shard (by sample)", "; ".join(" ".join(map(str, s)) for s in per_shard)),
            ("placement, microbatches", f"vision, projector, backbone on {WORLD} ranks (dp={WORLD}), M={M}"),
            ("by sample, balanced", f"{step['by sample'] * 1e3:.0f} ms, {step['balanced'] * 1e3:.0f} ms "
                                    f"for {BATCHES} steps"),
            ("vision forward + backward per rank", "; ".join(
                f"{key} " + " ".join(f"{r['vision'][key]:.1f} s" for r in results) for key in ("by sample", "balanced"))),
            ("per-round ratio: median [min, max]", f"{statistics.median(paired):.3f} [{paired[0]:.3f}, {paired[-1]:.3f}]"),
            ("largest relative loss difference", f"{worst:.1e}")]
    out = report(f"Encoder load balance on {WORLD} gloo ranks (median of {args.rounds})", rows,
                 "balanced/by-sample step time", ratio, "<= 0.8", args.json)
    print(f"balanced/by-sample step time = {ratio:.3f}")
    return out


if __name__ == "__main__":
    main()
