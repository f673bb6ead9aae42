"""The digits demo's data (examples/digits_sum.py) and its graph (examples/digits_sum.yaml), in
this process: each sound encodes its digit, each answer is the sum of what is shown and heard,
the held-out set is other images, and a collated batch fits the graph the demo trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from examples import digits_sum  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    return digits_sum.train_data()


@pytest.fixture(scope="module")
def held_out():
    return digits_sum.held_out_data()


def test_each_digits_tone_is_loudest_in_its_own_band():
    generator = torch.Generator().manual_seed(0)
    for digit in range(10):
        for _ in range(5):  # random phase, loudness and noise
            sound = digits_sum.digit_sound(digit, generator)
            assert sound.shape == (digits_sum.FRAMES, digits_sum.BANDS)
            assert int(sound.mean(0).argmax()) == digit + 1, digit


def test_answers_are_the_shown_digit_the_heard_digit_and_their_sum(train):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    dataset = train.dataset
    for i in range(0, len(dataset), 97):
        sample = dataset[i]
        a, b = int(targets[i]), int(dataset.b[i])
        assert sample["answer"] == f"{a}+{b}={a + b}"
        assert sample["prompt"] == "<image>+<audio>="
        assert sample["pixel_values"].shape == (1, 8, 8)
        assert -1.0 <= float(sample["pixel_values"].min()) and float(sample["pixel_values"].max()) <= 1.0


def test_held_out_samples_are_the_last_images_with_other_sounds(train, held_out):
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 8.0 - 1.0
    assert len(train.dataset) + len(held_out.dataset) == len(images)
    assert len(held_out.dataset) == digits_sum.HELD_OUT
    assert torch.equal(held_out.dataset[0]["pixel_values"][0], images[-digits_sum.HELD_OUT])
    assert not torch.equal(held_out.dataset.b, train.dataset.b[:digits_sum.HELD_OUT])


def test_a_collated_batch_fits_the_demo_graph(train):
    from mimo_builder._internal.data import GraphCollator
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.kinds.registry import active_registry
    from mimo_builder._internal.validation import validate_graph

    active_registry().add_roots(str(ROOT))
    valid = validate_graph(load_graph(str(ROOT / "examples/digits_sum.yaml")), 4)
    samples = [train.dataset[i] for i in range(8)]
    batch = GraphCollator(valid, train.tokenizer)(samples)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape == (8, valid.configs["lm"].seq_length)
    tokens = valid.configs["lm"].modality_token_ids
    # one token per modality: the projectors merge 5 image and 2 audio tokens into one each
    assert ((ids == tokens["image"]).sum(1) == 1).all() and ((ids == tokens["audio"]).sum(1) == 1).all()
    for row, sample in enumerate(samples):
        assert int(mask[row].sum()) == len(sample["answer"]) + 1  # the answer and its end
    assert batch["pixel_values"].shape == (8, 1, 8, 8)
    assert batch["audio_features"].shape == (8, digits_sum.FRAMES, digits_sum.BANDS)
