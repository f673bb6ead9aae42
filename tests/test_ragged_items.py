"""Ragged items: samples with 0 to 3 images of other sizes than the tower's grid, 0 to 2 audio
clips of other lengths, and text-only samples, give the same loss, grad norm and updated
weights on one rank at any microbatch count and on a disjoint placement (encoders DP2, the
backbone TP2), packed or not, from the whole batch or each rank's own share.

The reference is one microbatch on one rank. Tolerance 1e-5 relative, as the other parity
suites: the runs differ in float32 reduction order only (microbatches accumulated, two DP ranks
summed, two TP shards joined; items of one size meet in other GEMMs when a microbatch holds
other samples). With microbatches of 3 samples on DP2, ranks meet shards without any image or
clip (samples 9-11 are text-only), whose encoders then run nothing and still reduce gradients.
"""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from ragged_steps import check_runs

RTOL = 1e-5
ONE, ONE_PACKED = ("single", False, False), ("single", True, False)


def _runs(cases, counts, initial=None):
    from ragged_items import items_steps

    out = {}
    for case in cases:
        placement, packed, by_rank = case
        out[case] = items_steps(placement, packed, counts, initial, by_rank)
        initial = out[case]["initial"]
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _runs, [ONE, ONE_PACKED], (1, 2, 3))[0]


def _check(results: list[dict], reference: dict, counts) -> None:
    check_runs(results, reference, counts, RTOL)


def test_the_samples_are_ragged():
    from ragged_items import ITEMS, graph, items_batch
    from mimo_builder._internal.runtime.items import Items
    from mimo_builder._internal.validation import validate_graph

    batch = items_batch(validate_graph(graph("single"), 1), packed=False)
    images, clips = batch["pixel_values"], batch["audio_features"]
    assert isinstance(images, Items) and isinstance(clips, Items)
    assert images.counts == [len(i) for i, _ in ITEMS] and clips.counts == [len(c) for _, c in ITEMS]
    assert {tuple(i.shape[1:]) for i in images.flat()} == {(32, 32), (8, 8), (16, 24), (24, 16), (16, 16)}
    # placeholders: 17 + 2 tokens (32 px and 8 px images with the class token) in sample 0, 3 + 20 of its clip
    ids = batch["input_ids"][0]
    assert int((ids == 1).sum()) == 17 + 2 and int((ids == 2).sum()) == 3


def test_any_microbatch_count_on_one_rank(reference):
    _check([reference[ONE]], reference[ONE], (1, 2, 3))


def test_packed_rows_on_one_rank(reference):
    _check([reference[ONE_PACKED]], reference[ONE], (1, 2, 3))


@pytest.mark.slow
def test_a_disjoint_placement_packed_or_not_from_the_batch_or_each_ranks_share(reference):
    cases = [("disjoint4", False, False), ("disjoint4", True, True)]
    ranks = run_ranks(4, _runs, cases, (2, 3), reference[ONE]["initial"])
    for case in cases:
        _check([r[case] for r in ranks], reference[ONE], (2, 3))
    moved = reference[ONE]["runs"][1]["updated"]["vision"]
    assert any(not torch.equal(reference[ONE]["initial"]["vision"][k], v) for k, v in moved.items())


def test_generation_rows_hold_the_prompt_and_mark_where_the_answer_starts():
    from mimo_builder._internal.data.collate import GraphCollator, reference_answer
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.validation import validate_graph
    from ragged_items import graph

    valid = validate_graph(graph("single"), 1)
    chat = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
            "pixel_values": torch.zeros(3, 8, 8)}
    row = GraphCollator(valid, ByteTokenizer(), generation=True).tokenize(chat)
    text = b"User: " + b"\x00" * 2 + b"Hi\nAssistant: "  # 2 placeholders (8 px: one patch + class token)
    n = len(text)
    assert row["loss_mask"].nonzero().flatten().tolist() == [n - 1]
    assert row["input_ids"][:n].tolist() == [1 if b == 0 else b + 4 for b in text]
    assert row["input_ids"][n:].eq(0).all()
    assert reference_answer(chat) == "Yo" and reference_answer({"prompt": "x", "answer": "y"}) == "y"


def test_generating_together_equals_generating_alone():
    """Prompts of other lengths with their images and clips anywhere in them: each row's answer
    is the one it gets alone (its whole prompt embedded with its items in place)."""
    from ragged_items import generate_alone_and_together

    got = run_ranks(1, generate_alone_and_together)[0]
    assert len(set(got["prompt_lengths"].tolist())) == 3
    assert torch.equal(got["together"], got["alone"])


def test_a_video_is_its_frames_under_one_tag():
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.errors import DataError
    from mimo_builder._internal.validation import validate_graph
    from ragged_items import graph

    valid = validate_graph(graph("single"), 1)
    collate = GraphCollator(valid, ByteTokenizer())
    video, image = torch.zeros(4, 3, 8, 8), torch.zeros(3, 16, 16)  # 4 frames of 1 patch + class token; 4 + 1
    batch = collate([{"pixel_values": [image, video], "prompt": "<image> then <image>:", "answer": "a"}])
    ids = batch["input_ids"][0].tolist()
    assert batch["pixel_values"].counts == [5]  # the image and 4 frames, encoded one by one
    first = ids.index(1)
    assert ids[first:first + 5] == [1] * 5 and ids[first + 5] != 1  # the image's 5 placeholders
    assert ids.count(1) == 5 + 4 * 2  # then the video's 8 under the second tag
    with pytest.raises(DataError, match=r"the text names more <image> tags than the 1 item"):
        collate([{"pixel_values": video, "prompt": "<image><image>", "answer": "a"}])


@pytest.mark.slow
def test_evaluate_outputs_of_ragged_shards_join_padded():
    """Each DP shard pads its samples to its own longest; the joined output pads to the batch's."""
    from ragged_items import vision_outputs

    one = run_ranks(1, vision_outputs, "single")[0]
    four = run_ranks(4, vision_outputs, "disjoint4")[0]
    assert one.shape == four.shape
    assert torch.allclose(one, four, atol=1e-5)
    assert four[9:].abs().sum() == 0  # text-only samples: padding only
