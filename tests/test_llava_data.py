"""LLaVA-format JSON data (``--data llava:PATH``) and energon's VQA and interleaved samples, on
real files the tests write: PNGs of several sizes (RGB and grayscale), a JSON and a JSONL."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

from cli_in_process import ROOT, main_in_process
from mimo_builder._internal.data.llava import LlavaDataset, fit_size
from mimo_builder._internal.errors import ConfigError, DataError

PATCH, MAX = 8, 32  # graphs/vlm.yaml's vision node: patch_size 8, image_size 32
RECORDS = [
    {"id": "wide", "image": "wide.png",
     "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A box."}]},
    {"id": "two", "image": ["wide.png", "tiny.png"],
     "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Compare."},
                       {"from": "gpt", "value": "Same."}]},
    {"id": 7, "image": ["tiny.png", "wide.png"],
     "conversations": [{"from": "human", "value": "First <image> then\n<image>?"}, {"from": "gpt", "value": "Yes."}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]


def _png(path, size, color, mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "wide.png", (100, 50), (51, 102, 204))
    _png(tmp_path / "tiny.png", (5, 3), (0, 0, 0))
    _png(tmp_path / "square.png", (16, 16), (51, 102, 204))
    _png(tmp_path / "gray.png", (24, 40), 128, mode="L")
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return tmp_path


def _dataset(path, **kwargs):
    return LlavaDataset(path, None, patch_size=PATCH, max_size=MAX, **kwargs)


@pytest.mark.parametrize(("size", "patch", "largest", "expected"), [
    ((100, 50), 8, 32, (32, 16)),   # scaled by 0.32, the aspect ratio kept exactly
    ((5, 3), 8, 32, (8, 8)),        # smaller than a patch: one patch
    ((20, 12), 8, 32, (24, 16)),    # not scaled; 2.5 and 1.5 patches round up
    ((40, 10), 8, 30, (24, 8)),     # max 30 holds 3 patches of 8: scaled by 0.6, 6 pixels round to one patch
    ((1000, 3), 8, 32, (32, 8)),
    ((17, 16), 8, 32, (16, 16)),    # 2.125 patches round down
])
def test_sizes_are_whole_patches_within_the_maximum_aspect_ratio_kept(size, patch, largest, expected):
    assert fit_size(*size, patch, largest) == expected


def test_records_become_messages_and_normalised_images_of_whole_patches(folder):
    data = _dataset(folder / "data.json")
    assert len(data) == 4
    first = data[0]
    assert first["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                 {"role": "assistant", "content": "A box."}]
    (image,) = first["pixel_values"]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 32)
    # a uniform (51, 102, 204) image: (x / 255 - CLIP mean) / CLIP std per channel, worked out by hand
    expected = torch.tensor([-1.047743, -0.221305, 1.420674])[:, None, None].expand(3, 16, 32)
    torch.testing.assert_close(image, expected, atol=1e-4, rtol=0)
    tiny = data[2]["pixel_values"][0]  # 5 x 3 black pixels: one patch of -mean / std
    torch.testing.assert_close(tiny[0], torch.full((8, 8), -1.792263), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("channels", "shape"), [(1, (1, 32, 16)), (3, (3, 32, 16))])
def test_grayscale_images_read_as_one_channel_with_the_first_mean_and_std_or_as_rgb(folder, channels, shape):
    (folder / "gray.json").write_text(json.dumps([{"image": "gray.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "grey"}]}]))
    (image,) = _dataset(folder / "gray.json", num_channels=channels)[0]["pixel_values"]
    assert image.shape == shape  # 24 x 40 scaled by 0.8 to 19.2 x 32; 2.4 patches round to 2
    torch.testing.assert_close(image[0], torch.full(shape[1:], 0.076336), atol=1e-5, rtol=0)  # (128/255 - m) / s


def test_tags_are_added_once_per_image_only_where_no_turn_holds_one(folder):
    data = _dataset(folder / "data.json")
    two = data[1]
    assert [m["role"] for m in two["messages"]] == ["system", "user", "assistant"]
    assert two["messages"][1]["content"] == "<image>\n<image>\nCompare."
    assert [tuple(t.shape) for t in two["pixel_values"]] == [(3, 16, 32), (3, 8, 8)]
    tagged = data[2]
    assert tagged["messages"][0]["content"] == "First <image> then\n<image>?"
    assert [tuple(t.shape) for t in tagged["pixel_values"]] == [(3, 8, 8), (3, 16, 32)]


def test_text_only_records_have_no_image_key_and_jsonl_reads_the_same(folder):
    data, lines = _dataset(folder / "data.json"), _dataset(folder / "data.jsonl", image_key="images")
    assert data[3] == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert len(lines) == 4 and lines[3] == data[3]
    assert lines[1]["messages"] == data[1]["messages"] and len(lines[1]["images"]) == 2


def test_the_dataset_pickles_for_dataloader_workers(folder):
    data = _dataset(folder / "data.json")
    copy = pickle.loads(pickle.dumps(data))
    assert copy[1]["messages"] == data[1]["messages"]
    torch.testing.assert_close(copy[0]["pixel_values"][0], data[0]["pixel_values"][0])


def _write(folder, records, name="bad.json"):
    path = folder / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


HUMAN = [{"from": "human", "value": "q"}]


@pytest.mark.parametrize(("records", "message"), [
    ('[{"conversations": []},\n  {oops}]', "bad.json: line 2 column 4: not valid JSON"),
    ({"conversations": HUMAN}, "bad.json: holds a JSON dict, not a list of records"),
    ([["not", "a", "dict"]], "bad.json: record 0 is a list, not an object with 'conversations'"),
    ([{"id": "a", "conversations": HUMAN}, {"id": "b"}],
     "bad.json: record 1 (id 'b'): 'conversations' must be a non-empty list of turns, got None"),
    ([{"id": 3, "conversations": []}], "record 0 (id 3): 'conversations' must be a non-empty list"),
    ([{"id": "c", "conversations": [{"from": "bot", "value": "x"}]}],
     "record 0 (id 'c'): conversations[0].from is 'bot', not one of 'human', 'gpt', 'system'"),
    ([{"conversations": [{"from": "human", "value": 3}]}], "record 0: conversations[0].value must be text, got 3"),
    ([{"id": "d", "image": ["a.png", 4], "conversations": HUMAN}],
     "record 0 (id 'd'): 'image' must be a file name or a list of file names"),
    ([{"id": "e", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"}]}],
     "record 0 (id 'e'): the turns hold 1 <image> tag(s) for 2 image(s) in 'image'"),
    ([{"id": "f", "conversations": [{"from": "human", "value": "<image>"}]}],
     "record 0 (id 'f'): the turns hold 1 <image> tag(s) for 0 image(s)"),
    ([{"id": "g", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}],
     "record 0 (id 'g'): 1 image(s) but no <image> tag and no human turn to put one in"),
])
def test_structural_mistakes_are_named_with_the_file_record_and_field_at_construction(folder, records, message):
    with pytest.raises(DataError) as caught:
        _dataset(_write(folder, records))
    assert message in str(caught.value)
    assert str(folder / "bad.json") in str(caught.value)


def test_a_bad_jsonl_line_is_named_by_its_number(folder):
    path = _write(folder, '{"conversations": [{"from": "human", "value": "q"}]}\n\n{"conversations": [}\n',
                  "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 column 20: not valid JSON"):
        _dataset(path)


def test_missing_and_unreadable_images_are_named_when_the_sample_is_read(folder):
    (folder / "broken.png").write_bytes(b"not a png")
    path = _write(folder, [{"id": "gone", "image": "absent.png", "conversations": HUMAN},
                           {"image": ["wide.png", "broken.png"], "conversations": HUMAN}])
    data = _dataset(path)  # images are opened lazily
    with pytest.raises(DataError) as missing:
        data[0]
    assert f"record 0 (id 'gone'): image[0]: no such file {folder / 'absent.png'}" in str(missing.value)
    with pytest.raises(DataError) as broken:
        data[1]
    assert f"record 1: image[1]: cannot read {folder / 'broken.png'} as an image" in str(broken.value)


def test_an_image_root_elsewhere(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("json")
    path = _write(other, RECORDS[:1], "data.json")
    assert LlavaDataset(path, folder, patch_size=PATCH, max_size=MAX)[0]["pixel_values"][0].shape == (3, 16, 32)


def test_arguments_the_reader_cannot_take_are_config_errors(folder):
    with pytest.raises(ConfigError, match="RGB .num_channels 3. or grayscale .1. images, not num_channels 4"):
        _dataset(folder / "data.json", num_channels=4)
    with pytest.raises(ConfigError, match="std has 2 values for 3 channels"):
        _dataset(folder / "data.json", std=(0.5, 0.5))


# --- llava_data and --data llava:PATH ------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm():
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.validation import validate_graph

    return validate_graph(load_graph(str(ROOT / "graphs/vlm.yaml")))


def test_llava_data_reads_patch_size_channels_and_maximum_from_the_graphs_image_node(vlm, folder):
    from mimo_builder._internal.data.spec import GraphData, llava_data
    from mimo_builder._internal.data.tokenizer import ByteTokenizer

    data = llava_data(vlm, f"llava:{folder / 'data.json'}", None)
    assert isinstance(data, GraphData) and isinstance(data.tokenizer, ByteTokenizer)
    assert (data.dataset.patch_size, data.dataset.max_size, data.dataset.num_channels) == (8, 32, 3)
    assert data.dataset.image_root == folder and data.dataset[0]["pixel_values"][0].shape == (3, 16, 32)
    data.check(vlm, "--data")  # the collator takes its first sample


def test_tokenizer_names_a_hugging_face_tokenizer_folder(vlm, folder, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from mimo_builder._internal.data.spec import load_data
    from mimo_builder._internal.data.tokenizer import HFTokenizer

    words = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "hi": 3}, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tok")
    data = load_data(f"llava:{folder / 'data.json'}", "--data", vlm, tokenizer=str(tmp_path / "tok"))
    assert isinstance(data.tokenizer, HFTokenizer) and (data.tokenizer.pad_id, data.tokenizer.eos_id) == (0, 1)
    assert data.tokenizer.encode("hi there") == [3, 2]


def test_llava_data_needs_a_pixel_values_input_and_existing_paths(vlm, folder):
    from mimo_builder._internal.data.spec import llava_data
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.validation import validate_graph

    text_only = validate_graph(load_graph(str(ROOT / "graphs/mamba_lm.yaml")))
    with pytest.raises(ConfigError, match="bound to a node's pixel_values port; this graph binds none .inputs: input_ids"):
        llava_data(text_only, str(folder / "data.json"), None)
    with pytest.raises(ConfigError, match="no such file"):
        llava_data(vlm, str(folder / "absent.json"), None)
    with pytest.raises(ConfigError, match="is not a folder"):
        llava_data(vlm, str(folder / "data.json"), str(folder / "wide.png"))


def test_the_cli_takes_llava_data_an_image_root_and_a_tokenizer():
    from mimo_builder._internal.cli import _COMMANDS
    from mimo_builder._internal.cli_args import build_parser

    parser = build_parser(_COMMANDS)
    run = parser.parse_args(["run", "g.yaml", "--data", "llava:x.json", "--eval-data", "llava:y.jsonl",
                             "--image-root", "imgs", "--tokenizer", "tok"])
    assert (run.data, run.eval_data, run.image_root, run.tokenizer) == ("llava:x.json", "llava:y.jsonl", "imgs", "tok")
    generate = parser.parse_args(["generate", "g.yaml", "--load", "c", "--data", "llava:x.json", "--image-root", "d"])
    assert (generate.data, generate.image_root, generate.tokenizer) == ("llava:x.json", "d", None)


def _one_line_error(result, text):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr


def test_bad_llava_paths_exit_2_with_one_line_before_any_rank_starts(folder):
    run = ("run", "graphs/vlm.yaml", "--nproc", "4", "--steps", "1")
    absent = folder / "absent.json"
    _one_line_error(main_in_process(*run, "--data", f"llava:{absent}"),
                    f"error: --data: llava:{absent}: no such file")
    _one_line_error(main_in_process(*run, "--eval-data", f"llava:{absent}"),
                    f"error: --eval-data: llava:{absent}: no such file")
    _one_line_error(main_in_process(*run, "--data", f"llava:{folder / 'data.json'}", "--image-root", str(absent)),
                    f"error: --data: image root '{absent}' is not a folder")
    _one_line_error(main_in_process(*run, "--data", f"llava:{folder / 'data.json'}", "--tokenizer", str(absent)),
                    f"--tokenizer '{absent}' is not a folder")
    _one_line_error(main_in_process("generate", "graphs/vlm.yaml", "--nproc", "4", "--load", str(folder),
                                    "--data", f"llava:{absent}"), f"error: --data: llava:{absent}: no such file")


def test_llava_flags_without_llava_data_are_refused():
    run = ("run", "graphs/vlm.yaml", "--nproc", "4", "--steps", "1")
    _one_line_error(main_in_process(*run, "--image-root", "."),
                    "error: --image-root and --tokenizer go with --data or --eval-data llava:JSON")
    _one_line_error(main_in_process("--allow", "examples", *run, "--data", "examples.digits_sum:train_data",
                                    "--tokenizer", "."),
                    "error: --data examples.digits_sum:train_data: --tokenizer goes with --data llava:PATH")


# --- energon's VQA and interleaved samples ---------------------------------------------------------

def test_vqa_samples_take_the_highest_weighted_answer():
    from megatron.energon import VQASample

    from mimo_builder._internal.data.energon import caption_sample, vqa_sample

    image = torch.rand(3, 16, 8)
    sample = VQASample(__key__="q1", __restore_key__=(), image=image, context="What colour?",
                       answers=["red", "blue", "green"], answer_weights=torch.tensor([0.2, 0.7, 0.1]))
    expected = {"pixel_values": [image], "messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                                                      {"role": "assistant", "content": "blue"}]}
    assert vqa_sample(sample) == expected
    assert caption_sample(sample) == expected  # the default converter dispatches on the type
    plain = VQASample(__key__="q2", __restore_key__=(), image=image, context="Here <image>, what?", answers="a cat")
    assert vqa_sample(plain, image_key="img")["messages"] == [{"role": "user", "content": "Here <image>, what?"},
                                                               {"role": "assistant", "content": "a cat"}]
    unanswered = VQASample(__key__="q3", __restore_key__=(), image=image, context="Why?")
    assert vqa_sample(unanswered)["messages"] == [{"role": "user", "content": "<image>\nWhy?"}]
    first = VQASample(__key__="q4", __restore_key__=(), image=image, context="Q", answers=["x", "y"])
    assert vqa_sample(first)["messages"][1]["content"] == "x"
    with pytest.raises(DataError, match="'q5': 2 answers but 1 answer_weights"):
        vqa_sample(VQASample(__key__="q5", __restore_key__=(), image=image, context="Q", answers=["x", "y"],
                             answer_weights=torch.tensor([1.0])))


def test_interleaved_samples_tag_their_images_and_answer_with_the_last_text():
    from megatron.energon import CaptioningSample, InterleavedSample

    from mimo_builder._internal.data.energon import caption_sample, interleaved_sample

    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 16)
    sample = InterleavedSample(__key__="i1", __restore_key__=(), sequence=["Look:", a, "and", b, "Two boxes."])
    converted = caption_sample(sample, image_key="img")
    assert converted == interleaved_sample(sample, image_key="img")
    assert converted["img"][0] is a and converted["img"][1] is b
    assert converted["messages"] == [{"role": "user", "content": "Look:\n<image>\nand\n<image>"},
                                     {"role": "assistant", "content": "Two boxes."}]
    ends_with_image = interleaved_sample(InterleavedSample(__key__="i2", __restore_key__=(), sequence=["See", a]))
    assert ends_with_image["messages"] == [{"role": "user", "content": "See\n<image>"}]
    text = interleaved_sample(InterleavedSample(__key__="i3", __restore_key__=(), sequence=["Only text"]))
    assert text == {"messages": [{"role": "user", "content": "Only text"}]}
    with pytest.raises(DataError, match=r"'i4': sequence\[1\] \(int\) is neither text nor a \[C, H, W\] image"):
        interleaved_sample(InterleavedSample(__key__="i4", __restore_key__=(), sequence=["x", 3]))
    caption = CaptioningSample(__key__="c", __restore_key__=(), image=a, caption="a box")
    assert caption_sample(caption) == {"pixel_values": a, "prompt": "<image>", "answer": "a box"}  # unchanged


def test_image_files_follow_the_nodes_normalisation(tmp_path):
    """A node that says image_mean/image_std [0.5] reads white as 1 and black as -1 (CLIP's otherwise)."""
    import numpy as np
    from PIL import Image as PILImage

    from mimo_builder._internal.data.llava import read_image
    from mimo_builder._internal.data.prompt import image_processing
    from submodels.vision_config import VisionConfig

    PILImage.fromarray(np.array([[0, 255] * 4] * 8, dtype=np.uint8)).save(tmp_path / "stripes.png")
    half = VisionConfig(num_layers=1, hidden_size=8, num_attention_heads=1, image_size=8, patch_size=4,
                        num_channels=1, image_mean=[0.5], image_std=[0.5])
    pixels = read_image(tmp_path / "stripes.png", "test", **image_processing(half))
    assert pixels.shape == (1, 8, 8) and sorted(set(pixels.flatten().tolist())) == [-1.0, 1.0]
    clip = image_processing(half.model_copy(update={"image_mean": None, "image_std": None}))
    assert "mean" not in clip and "std" not in clip  # the reader's CLIP defaults
