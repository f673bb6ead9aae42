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


# --- the multi-image demo (examples/digits_chat.py, examples/digits_chat.yaml) ---------------

from examples import digits_chat  # noqa: E402


@pytest.fixture(scope="module")
def chat_train():
    pytest.importorskip("transformers")
    return digits_chat.train_data()


@pytest.fixture(scope="module")
def chat_valid():
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.kinds.registry import active_registry
    from mimo_builder._internal.validation import validate_graph

    active_registry().add_roots(str(ROOT))
    return validate_graph(load_graph(str(ROOT / "examples/digits_chat.yaml")), 2)


def test_chat_samples_show_one_to_four_images_of_several_sizes_and_ask_two_questions(chat_train):
    from sklearn.datasets import load_digits

    targets, dataset = load_digits().target, chat_train.dataset
    counts, sizes = set(), set()
    for i in range(0, 2000, 7):
        sample = dataset[i]
        images, turns = sample["pixel_values"], sample["messages"]
        digits = [int(targets[k]) for k in dataset.picks[i, :len(images)]]
        counts.add(len(images))
        sizes |= {tuple(image.shape) for image in images}
        assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[0]["content"] == "<image>" * len(images) + "How many digits?"
        assert turns[1]["content"] == str(len(images)) and turns[2]["content"] == "What is their sum?"
        assert turns[3]["content"] == "+".join(map(str, digits)) + f"={sum(digits)}"
        assert all(-1.0 <= float(image.min()) and float(image.max()) <= 1.0 for image in images)
    assert counts == {1, 2, 3, 4}
    assert sizes == {(1, 16, 16), (1, 8, 32), (1, 32, 8)}


def test_the_tokenizers_image_tag_is_the_graphs_placeholder_and_fits_its_vocabulary(chat_train, chat_valid):
    hf, lm = chat_train.tokenizer.tokenizer, chat_valid.configs["lm"]
    assert hf.convert_tokens_to_ids("<image>") == lm.modality_token_ids["image"] == 4
    assert len(hf) <= lm.vocab_size
    assert hf.chat_template  # the conversation is rendered by the template
    for sum_ in range(37):  # each sum is one token
        assert len(hf.encode(str(sum_), add_special_tokens=False)) == 1


def test_a_collated_chat_batch_fits_the_multi_image_graph(chat_train, chat_valid):
    from mimo_builder._internal.data import GraphCollator
    from mimo_builder._internal.runtime.batch import check_batch

    samples = [chat_train.dataset[i] for i in range(32)]
    batch = GraphCollator(chat_valid, chat_train.tokenizer)(samples)
    check_batch(chat_valid, batch)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape == (32, chat_valid.configs["lm"].seq_length)
    images = (ids == chat_valid.configs["lm"].modality_token_ids["image"]).sum(1)
    assert images.tolist() == [len(s["pixel_values"]) for s in samples]  # one backbone token per image
    for row, sample in enumerate(samples):  # the two answers, each with <|im_end|> and its newline
        n = len(sample["pixel_values"])
        assert int(mask[row].sum()) == (1 + 2) + (2 * n + 1 + 2)


def test_longest_chat_fits_the_graphs_seq_length(chat_train, chat_valid):
    from mimo_builder._internal.data import GraphCollator

    four = next(i for i in range(len(chat_train.dataset)) if int(chat_train.dataset.counts[i]) == 4)
    sample = chat_train.dataset[four]
    tokens = GraphCollator(chat_valid, chat_train.tokenizer).tokenize(sample)
    assert int(tokens["seq_lengths"]) <= chat_valid.configs["lm"].seq_length


def test_held_out_chats_show_only_the_last_images():
    pytest.importorskip("transformers")
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)
    train, held_out = digits_chat.train_data().dataset, digits_chat.held_out_data().dataset
    assert torch.equal(held_out.sized[0], digits_chat.images_at(images[-digits_chat.HELD_OUT:], (16, 16)))
    assert torch.equal(train.sized[0], digits_chat.images_at(images[:-digits_chat.HELD_OUT], (16, 16)))
    assert int(held_out.picks.max()) < digits_chat.HELD_OUT and len(held_out) == digits_chat.HELD_OUT_SAMPLES
    assert len(train) == digits_chat.TRAIN_SAMPLES


def test_the_lora_example_is_the_vlm_graph_with_adapters_on_its_backbone():
    """docs/lora.md's examples/vlm_lora.yaml: graphs/vlm.yaml plus lora: {rank: 4, alpha: 8} on lm."""
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Graph

    lora = Graph.from_yaml((ROOT / "examples/vlm_lora.yaml").read_text())
    assert lora.nodes["lm"].lora.rank == 4 and lora.nodes["lm"].lora.alpha == 8
    lora.nodes["lm"].lora = None
    assert lora == vlm()
