"""Samples with ragged items for the parity tests: 0 to 3 images of 8 to 32 px (other sizes than
the tower's 32 px grid too), 0 to 2 audio clips of 6 to 40 frames, text-only samples, prompts
with the tags in any order (run inside rank processes, and by the tests to check the batch)."""

from __future__ import annotations

BATCH = 12
IMAGE_SIZES = ((32, 32), (8, 8), (16, 24), (24, 16), (16, 16))
CLIP_FRAMES = (6, 40, 17, 9)
ITEMS = (  # per sample: (image size indices, clip indices); the last three are text-only
    ((0, 1), (0,)), ((2,), ()), ((), (1, 2)), ((3, 4, 1), (3,)), ((0,), ()), ((), ()),
    ((1, 1), (0, 3)), ((4,), (2,)), ((2, 0), ()), ((), ()), ((), ()), ((), ()),
)


def graph(placement: str):
    """The avlm graph under ``placement`` ("single" or "disjoint4"), its tower taking images up to
    32 px of any multiple of 8 (learned positions for 16 px, interpolated for the rest)."""
    from graphs.avlm import avlm

    g = avlm(placement)
    g.nodes["vision"].config = {**g.nodes["vision"].config, "image_size": 16, "max_image_size": 32}
    return g


def samples() -> list[dict]:
    """The samples: random images and clips, tags where their items stand, answers of 1 to 20 bytes."""
    import torch

    generator = torch.Generator().manual_seed(5)
    out = []
    for i, (images, clips) in enumerate(ITEMS):
        pictures = [torch.randn(3, *IMAGE_SIZES[k], generator=generator) for k in images]
        sounds = [torch.randn(CLIP_FRAMES[k], 16, generator=generator) for k in clips]
        tags = "".join(f"<image>{j}" for j in range(len(pictures))) + " and " + "<audio>" * len(sounds)
        sample = {"prompt": f"{i}: {tags}?", "answer": "xyz0123456789abcdefg"[: 1 + (7 * i) % 20]}
        if pictures:
            sample["pixel_values"] = pictures
        if sounds:
            sample["audio_features"] = sounds if len(sounds) > 1 else sounds[0]
        out.append(sample)
    return out


def items_batch(valid, packed: bool) -> dict:
    """The collated global batch (byte tokenizer); packed, with ``seq_lengths``."""
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer

    batch = GraphCollator(valid, ByteTokenizer())(samples())
    if not packed:
        batch.pop("seq_lengths", None)
    return batch


def items_steps(placement: str, packed: bool, counts, initial=None, by_rank: bool = False) -> dict:
    """:func:`ragged_steps.ragged_steps` on these samples."""
    from ragged_steps import ragged_steps

    return ragged_steps(graph(placement), packed, counts, initial, by_rank, batch_of=items_batch)


def generate_alone_and_together() -> dict:
    """Greedy answers of samples 0, 3 and 6 (images and clips, prompts of other lengths, tags
    beyond the shortest prompt) generated together and each alone, on one rank."""
    import torch

    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from ragged_steps import build

    model = build(graph("single"))
    picked = [samples()[i] for i in (0, 3, 6)]
    collate = GraphCollator(model.valid, ByteTokenizer(), generation=True)
    schedule = GraphSchedule(model)
    together = schedule.generate(collate(picked), 6)
    alone = torch.cat([schedule.generate(collate([s]), 6) for s in picked])
    lengths = collate(picked)["loss_mask"].argmax(dim=1) + 1
    model.close()
    return dict(together=together, alone=alone, prompt_lengths=lengths)


def vision_outputs(placement: str):
    """``evaluate``'s ``vision.embeddings`` for the whole batch at 2 microbatches (rank 0; None elsewhere)."""
    import torch.distributed as dist

    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from ragged_steps import build

    model = build(graph(placement))
    out = GraphSchedule(model).evaluate(items_batch(model.valid, False), 2, outputs=["vision.embeddings"])
    model.close()
    return out.get("vision.embeddings") if dist.get_rank() == 0 else None
