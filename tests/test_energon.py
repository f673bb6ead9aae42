"""EnergonSource on a real Megatron-Energon dataset the test writes and prepares itself.

scikit-learn's digits (8x8, upscaled to 32x32 RGB PNGs) with their label as caption, in 4 tars,
prepared with energon's own ``energon prepare`` command (non-interactive, in process).
"""

from __future__ import annotations

import gc
import io
import sys
import tarfile

import numpy as np
import pytest
import torch

SHARDS, PER_SHARD = 4, 16
HASH, IMAGE_TOKENS = 4 + ord("#"), 17  # ByteTokenizer's '#'; the vlm vision node's 16 patches + class token


@pytest.fixture(scope="module", autouse=True)
def _frozen_gc():
    """Energon runs a full gc.collect() whenever it builds a loader (~0.5 s over this process's
    half a million objects); freezing the objects alive now makes each collect cheap."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(dataset folder, the written images as [N, 3, 32, 32] uint8, their labels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from megatron.energon.tools.prepare import command as energon_prepare

    found = load_digits()
    count = SHARDS * PER_SHARD
    gray = np.kron(found.images[:count] * 255 / 16, np.ones((4, 4))).astype(np.uint8)  # [N, 32, 32]
    images, labels = np.repeat(gray[:, None], 3, axis=1), found.target[:count]
    folder = tmp_path_factory.mktemp("digits")
    for shard in range(SHARDS):
        with tarfile.open(folder / f"digits-{shard}.tar", "w") as tar:
            for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                png = io.BytesIO()
                Image.fromarray(images[i].transpose(1, 2, 0)).save(png, format="png")
                _add(tar, f"{i:04d}.png", png.getvalue())
                _add(tar, f"{i:04d}.txt", str(labels[i]).encode())
    energon_prepare.main([str(folder), "--non-interactive", "--split-ratio", "1,0,0", "--no-progress",
                          "--num-workers", "1", "--sample-type", "CaptioningSample",
                          "--field-map", '{"image": "png", "caption": "txt"}'], standalone_mode=False)
    return folder, images, labels


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _keyed(sample):
    """A collator sample that also keeps energon's sample key (the written index)."""
    return {"pixel_values": sample.image, "prompt": "<image>#", "answer": sample.caption, "key": sample.__key__}


def _keys(source, step, chunk, layout):
    return [s["key"] for s in source.samples(step, chunk, layout)]


def test_every_source_gives_a_chunk_of_a_step_the_same_samples_whichever_step_it_is_asked_first(digits):
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    layout = BatchLayout(batch_size=8, num_microbatches=2, chunks_per_microbatch=2)  # 4 chunks of 2
    in_order = EnergonSource(digits[0], _keyed)
    read = {step: _keys(in_order, step, 2, layout) for step in (1, 2, 3)}
    resumed = EnergonSource(digits[0], _keyed)  # as on another rank, or in a resumed run
    assert _keys(resumed, 3, 2, layout) == read[3]  # a later step first: skips steps 1-2
    assert _keys(resumed, 3, 2, layout) == read[3]  # the same step again
    assert _keys(resumed, 1, 2, layout) == read[1]  # an earlier step: starts over
    assert _keys(resumed, 2, 2, layout) == read[2]
    assert len({key for keys in read.values() for key in keys}) == 6


def test_the_chunks_of_a_step_partition_the_dataset_over_an_epoch(digits):
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    layout = BatchLayout(batch_size=8, num_microbatches=1, chunks_per_microbatch=4)  # 4 chunks of 2
    source = EnergonSource(digits[0], _keyed)
    steps_per_epoch = SHARDS * PER_SHARD // layout.batch_size
    epochs = [[key for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1) for c in range(4)
               for key in _keys(source, s, c, layout)] for e in (0, 1)]
    everything = sorted(f"{i:04d}" for i in range(SHARDS * PER_SHARD))
    assert sorted(epochs[0]) == everything  # each sample once, in some chunk of some step
    assert sorted(epochs[1]) == everything


def test_ranks_read_their_own_chunks_through_rank_loader_and_agree_on_every_row(digits):
    """vlm: vision dp=2 on ranks 0-1 reads one chunk of two, the backbone on rank 2 reads both;
    each image rank 0 reads is the digit whose label rank 2's row answers."""
    from test_data import _vlm

    from mimo_builder._internal.data import ByteTokenizer, GraphCollator, RankLoader
    from mimo_builder._internal.data.energon import EnergonSource

    folder, images, labels = digits
    valid = _vlm()
    collate = GraphCollator(valid, ByteTokenizer())
    loaders = {rank: RankLoader(valid, EnergonSource(folder, _keyed), collate, 4, rank, last_step=3)
               for rank in (0, 2)}
    assert loaders[0].chunks == [0] and loaders[2].chunks == [0, 1]
    for (step, vision), (_, text) in zip(loaders[0], loaders[2]):
        pixels = vision.rows["pixel_values"]  # rows 0-1 of the global batch
        assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
        answers = text.rows["labels"][:2, IMAGE_TOKENS]
        assert (text.rows["input_ids"][:, IMAGE_TOKENS] == HASH).all()
        for image, answer in zip(pixels, answers.tolist()):
            index = _written_index(image, images)
            assert answer == 4 + ord(str(labels[index])), (step, index)


def _written_index(image: torch.Tensor, images: np.ndarray) -> int:
    """Which written image ``image`` decodes (energon gives RGB floats in [0, 1])."""
    distances = (torch.from_numpy(images).float() / 255 - image).abs().flatten(1).amax(1)
    best = int(distances.argmin())
    assert distances[best] < 1e-6, float(distances[best])
    return best


def test_the_default_converter_reads_captioning_samples(digits):
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    folder, images, labels = digits
    samples = EnergonSource(folder).samples(1, 0, BatchLayout(4, 1, 1))
    assert [sorted(s) for s in samples] == [["answer", "pixel_values", "prompt"]] * 4
    for sample in samples:
        assert sample["prompt"] == "<image>" and sample["answer"] == str(labels[_written_index(
            sample["pixel_values"], images)])


def test_more_chunks_than_samples_and_unprepared_folders_are_named(digits, tmp_path):
    from mimo_builder._internal.data import DataError
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    source = EnergonSource(digits[0], _keyed)
    with pytest.raises(DataError, match=r"holds \[64\] sample\(s\).*65 chunk\(s\) x 1 worker\(s\) need at least 65"):
        source.samples(1, 0, BatchLayout(130, 1, 65))
    with pytest.raises(DataError, match=r"cannot read split 'train' of energon dataset .*energon prepare"):
        EnergonSource(tmp_path)
    with pytest.raises(DataError, match=r"cannot read split 'val'.*No shards found in split part 'val'"):
        EnergonSource(digits[0], split="val")


def test_without_energon_installed_the_source_names_the_extra(monkeypatch, tmp_path):
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.errors import DependencyError

    monkeypatch.setitem(sys.modules, "megatron.energon", None)  # what `import` sees when it is absent
    with pytest.raises(DependencyError, match=r"pip install 'mimo-builder\[energon\]'"):
        EnergonSource(tmp_path)


# --- the stream's state in a checkpoint ------------------------------------------------------------


class _Converted:
    """A converter that also notes which samples it converted (energon converts each sample it reads)."""

    def __init__(self):
        self.keys = []

    def __call__(self, sample):
        self.keys.append(sample.__key__)
        return _keyed(sample)


@pytest.mark.parametrize("num_workers, shuffle", [(0, None), (0, 4), (2, 4)])
def test_a_restored_stream_reads_on_exactly_where_the_straight_run_does(digits, num_workers, shuffle):
    """The state after step 3 of a straight run, through JSON, into a fresh source: its steps 4-6
    are the straight run's."""
    import json

    from test_data import _vlm

    from mimo_builder._internal.data import ByteTokenizer, GraphCollator, RankLoader
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.document.graph import Placement
    from mimo_builder._internal.validation import validate_graph

    graph = _vlm().graph
    for node in graph.nodes.values():
        node.placement = Placement(tp=2) if node.builder == "mamba" else Placement(size=1)  # rank 0 reads all
    valid = validate_graph(graph, 2)
    collate = GraphCollator(valid, ByteTokenizer())

    sources = []

    def loader(converter, first, last):
        sources.append(EnergonSource(digits[0], converter, num_workers=num_workers, shuffle_buffer_size=shuffle))
        return RankLoader(valid, sources[-1], collate, 4, 0, first_step=first, last_step=last)

    def answers(batches):
        return [batch.rows["labels"][:, IMAGE_TOKENS].tolist() for _, batch in batches]

    straight, states, straight_loader = [], None, loader(_keyed, 1, 6)
    for step, batch in straight_loader:
        straight.append(batch.rows["labels"][:, IMAGE_TOKENS].tolist())
        if step == 3:  # where a checkpoint saves, through JSON as its files hold it
            states = json.loads(json.dumps(straight_loader.states()))
    assert sorted(states) == ["0"] and states["0"]["step"] == 3  # one chunk: the lm's dp is 1
    converted = _Converted()
    resumed = loader(converted, 4, 6)
    resumed.restore({int(c): s for c, s in states.items()})
    assert answers(resumed) == straight[3:]
    if num_workers == 0 and shuffle is None:  # read on, not again: only steps 4-6's 3 x 4 samples
        assert len(converted.keys) == 12
    for source in sources:
        source.close()  # energon's worker processes end with their loaders


def test_a_saved_stream_state_creates_only_energon_records():
    from mimo_builder._internal.data import DataError
    from mimo_builder._internal.data.energon_state import decode, encode

    for bad in ({"class": {"name": "os:system", "fields": {}}}, {"dict": [], "kind": "subprocess:Popen"},
                {"ndarray": {"dtype": "|O", "shape": [1], "data": ""}}, {"pickle": "gASV"}):
        with pytest.raises(DataError, match="data loader state"):
            decode(bad)
    with pytest.raises(DataError, match="cannot save a value of type object"):
        encode([object()])
    state = {"rng": b"\x00\x01", "order": (1, [2.5, None]), "tensor": torch.arange(3)}
    back = decode(encode(state))
    assert back["rng"] == b"\x00\x01" and back["order"] == (1, [2.5, None]) and back["tensor"].tolist() == [0, 1, 2]


DATA_MODULE = '''
import os

from mimo_builder._internal.data import ByteTokenizer, GraphData
from mimo_builder._internal.data.energon import EnergonSource


def _logged(sample):
    with open(os.environ["READ_LOG"], "a") as log:
        log.write(sample.__key__ + "\\n")
    return {"pixel_values": sample.image, "prompt": "<image>#", "answer": sample.caption}


def train_data():
    return GraphData(EnergonSource(os.environ["DIGITS"], _logged), ByteTokenizer(), num_workers=0)
'''


def _straight_keys(folder, steps: int, batch_size: int) -> list[str]:
    """The samples a one-chunk run reads in ``steps`` steps, in order."""
    from mimo_builder._internal.data.energon import EnergonSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    source = EnergonSource(folder, _keyed)
    return [key for step in range(1, steps + 1) for key in _keys(source, step, 0, BatchLayout(batch_size, 1, 1))]


def test_a_resumed_run_reads_the_samples_the_straight_run_reads_and_no_others(digits, tmp_path, capfd):
    """mimo-builder run --save at step 3, then --load to step 6: the samples read are the straight
    run's, in the same order, and none of steps 1-3 is read again."""
    import yaml
    from pathlib import Path

    from cli_in_process import run_in_process

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "digits_stream.py").write_text(DATA_MODULE)
    doc = yaml.safe_load((root / "graphs/vlm.yaml").read_text())
    doc["nodes"]["lm"]["config"].update(vocab_size=260, seq_length=24)
    for node in doc["nodes"].values():
        node["placement"] = {}
    (tmp_path / "graph.yaml").write_text(yaml.safe_dump(doc))

    def run(log, *extra):
        env = {"DIGITS": str(digits[0]), "READ_LOG": str(tmp_path / log)}
        done = run_in_process(capfd, "--allow", "digits_stream", "run", "graph.yaml", "--batch-size", "4",
                              "--data", "digits_stream:train_data", *extra, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, (tmp_path / log).read_text().split()

    straight = _straight_keys(digits[0], steps=6, batch_size=4)
    _, first = run("split.log", "--steps", "3", "--save", "ckpt")
    assert first == straight[:12]
    (step_dir,) = (tmp_path / "ckpt").glob("step_*")
    assert (step_dir / "data" / "chunk_0.json").is_file()
    out, both = run("split.log", "--steps", "6", "--load", "ckpt")
    assert "data: the stream continues after step 3 from the checkpoint's state" in out
    assert both == straight and len(straight) == 24
