"""From samples to graph batches, read per rank: the collator, chunk layout, sources, the loader.

The multi-rank test trains the vlm graph (vision dp=2 on ranks 0-1, backbone tp=2 on ranks 2-3)
from a dataset read by RankLoader: each rank reads only its nodes' shards, and the loss equals
the loss of the whole batch built from the same samples on every rank.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from multirank import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = 1  # the vlm backbone's placeholder id for images


def _vlm(world_size=4):
    import yaml

    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.validation import validate_graph

    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    doc["nodes"]["lm"]["config"].update(vocab_size=260, seq_length=24)  # 256 bytes + 4 reserved ids
    doc["outputs"] = ["lm.loss", "lm.correct"]
    return validate_graph(Graph.from_dict(doc), world_size)


class Pictures:
    """Random 32x32 images, each asked for its index as text; records which indices were read."""

    def __init__(self, n=20):
        self.images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.read: list[int] = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.read.append(i)
        return {"pixel_values": self.images[i], "prompt": "<image>#", "answer": str(i)}


# --- single process -------------------------------------------------------------------------

def test_a_prompt_tag_becomes_one_placeholder_per_image_token_and_the_loss_covers_the_answer():
    from mimo_builder._internal.data import ByteTokenizer, GraphCollator

    valid = _vlm()
    collate = GraphCollator(valid, ByteTokenizer())  # vision: (32 / 8)^2 = 16 patches + a class token
    row = collate.tokenize({"pixel_values": torch.zeros(3, 32, 32), "prompt": "<image>#", "answer": "12"})
    hash_, one, two, eos, pad = 4 + ord("#"), 4 + ord("1"), 4 + ord("2"), 3, 0
    ids = [IMAGE] * 17 + [hash_, one, two, eos]  # 21 tokens: inputs are the first 20, labels the last 20
    assert row["input_ids"].tolist() == ids[:-1] + [pad] * 4
    assert row["labels"].tolist() == ids[1:] + [pad] * 4
    # learned: the label after '#' ('1'), then '2', then the end of sequence
    assert row["loss_mask"].tolist() == [0.0] * 17 + [1.0] * 3 + [0.0] * 4
    assert row["position_ids"].tolist() == list(range(24))


def test_collated_batches_pass_the_graphs_batch_checks():
    from mimo_builder._internal.data import ByteTokenizer, GraphCollator
    from mimo_builder._internal.runtime.batch import check_batch

    valid = _vlm()
    batch = GraphCollator(valid, ByteTokenizer())([Pictures()[i] for i in range(4)])
    assert check_batch(valid, batch) == 4
    assert set(batch) == {"pixel_values", "input_ids", "labels", "loss_mask"}  # vlm binds no position_ids


@pytest.mark.parametrize("sample, message", [
    ({"pixel_values": torch.zeros(3, 32, 32), "prompt": "#", "answer": "1"}, r"sample 0: the text names 0 <image> tag\(s\) but the sample brings 1 item\(s\) to lm.image "
     r"\(from 'pixel_values'\)"),
    ({"pixel_values": torch.zeros(3, 32, 32), "prompt": "<image><image>", "answer": "1"},
     r"sample 0: the text names more <image> tags than the 1 item\(s\) the sample brings to lm.image"),
    ({"pixel_values": torch.zeros(3, 32, 32), "prompt": "<image>", "answer": "x" * 9},
     r"sample 0: 27 tokens \(prompt 17, answer 9, end of sequence 1\) do not fit node 'lm' seq_length 24"),
    ({"prompt": "<image>", "answer": "1"}, r"sample 0: the text names more <image> tags than the 0 item\(s\)"),
    ({"pixel_values": torch.zeros(3, 12, 32), "prompt": "<image>", "answer": "1"},
     r"sample 0\['pixel_values'\]\[0\]: an image of 12 x 32 pixels: height and width must be multiples of "
     r"patch_size 8 from 8 to 32"),
    ({"pixel_values": 3.0, "prompt": "<image>", "answer": "1"},
     r"sample 0\['pixel_values'\] must be an array without the batch axis"),
])
def test_samples_that_do_not_fit_are_named_errors(sample, message):
    from mimo_builder._internal.data import ByteTokenizer, DataError, GraphCollator

    with pytest.raises(DataError, match=message):
        GraphCollator(_vlm(), ByteTokenizer())([sample])


def test_images_of_different_sizes_become_items():
    from mimo_builder._internal.data import ByteTokenizer, GraphCollator
    from mimo_builder._internal.runtime.items import Items

    samples = [{"pixel_values": torch.zeros(3, 32, 32), "prompt": "<image>", "answer": "1"},
               {"pixel_values": torch.zeros(3, 16, 16), "prompt": "<image>", "answer": "1"}]
    batch = GraphCollator(_vlm(), ByteTokenizer())(samples)
    assert isinstance(batch["pixel_values"], Items)
    assert [[tuple(i.shape) for i in s] for s in batch["pixel_values"].samples] == [[(3, 32, 32)], [(3, 16, 16)]]


def test_each_rank_needs_the_chunks_of_its_nodes_shards():
    from mimo_builder._internal.runtime.shards import BatchLayout, ShardError

    valid = _vlm()  # vision dp=2 on ranks 0-1, lm tp=2 (dp=1) on ranks 2-3
    layout = BatchLayout.of(valid, batch_size=8, num_microbatches=2)
    assert (layout.num_chunks, layout.chunk_size) == (4, 2)  # 2 microbatches x 2 vision shards
    assert layout.key_chunks(valid, 0) == {"pixel_values": [0, 2]}  # rows 0-1 and 4-5
    assert layout.key_chunks(valid, 1) == {"pixel_values": [1, 3]}
    assert layout.needed_chunks(valid, 3) == [0, 1, 2, 3]
    assert list(layout.rows(3)) == [6, 7]
    with pytest.raises(ShardError, match=r"batch size 6 does not split into 2 microbatch\(es\).*multiple of 4"):
        BatchLayout.of(valid, batch_size=6, num_microbatches=2)


def test_a_rank_share_cut_from_a_global_batch_holds_its_shard_rows():
    from mimo_builder._internal.runtime.shards import RankBatch

    valid = _vlm()
    batch = {"pixel_values": torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 32, 32),
             "input_ids": torch.arange(8).view(8, 1).expand(8, 24)}
    share = RankBatch.from_global(valid, batch, rank=1, num_microbatches=2)
    assert set(share.rows) == {"pixel_values"}
    assert share.microbatch("pixel_values", 1)[:, 0, 0, 0].tolist() == [6.0, 7.0]


def test_an_indexed_source_gives_every_step_the_same_samples_however_it_is_asked():
    from mimo_builder._internal.data import IndexedSource
    from mimo_builder._internal.runtime.shards import BatchLayout

    layout = BatchLayout(batch_size=8, num_microbatches=1, chunks_per_microbatch=2)
    order = [torch.randperm(20, generator=torch.Generator().manual_seed(7 + epoch)).tolist() for epoch in (0, 1)]
    stream = order[0] + order[1]
    data = Pictures()
    source = IndexedSource(data, seed=7)
    third_step_second_chunk = [int(s["answer"]) for s in source.samples(3, 1, layout)]
    assert third_step_second_chunk == stream[16 + 4:16 + 8]  # positions 20-23: the next epoch's order
    again = IndexedSource(data, seed=7)
    again.samples(1, 0, layout)
    assert [int(s["answer"]) for s in again.samples(3, 1, layout)] == third_step_second_chunk
    unshuffled = IndexedSource(data, shuffle=False)
    assert [int(s["answer"]) for s in unshuffled.samples(2, 0, layout)] == [8, 9, 10, 11]


# --- on four ranks --------------------------------------------------------------------------

def _read_per_rank(_):
    """Each rank's reads, its share from 1 and 2 DataLoader workers, and evaluation/training
    losses from its share and from the whole batch."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.data import ByteTokenizer, GraphCollator, IndexedSource, RankLoader
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    valid, rank = _vlm(), dist.get_rank()
    (model,) = CompositeBuilder(valid.graph, seed=3).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    with model:
        data = Pictures()
        collate = GraphCollator(valid, ByteTokenizer())
        loaders = [RankLoader(valid, IndexedSource(data, seed=5), collate, 8, rank, num_microbatches=2,
                              last_step=2, num_workers=workers) for workers in (0, 1)]
        (_, first), (_, share) = list(loaders[0])
        reads = sorted(data.read)
        (_, first_from_worker), _ = list(loaders[1])
        same = all(torch.equal(first.rows[k], first_from_worker.rows[k]) for k in first.rows)
        order = torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
        whole = collate([data[i] for i in order[8:16]])  # step 2's samples, every key
        schedule = GraphSchedule(model)
        from_share, from_whole = schedule.evaluate(share, 2), schedule.evaluate(whole, 2)
        trained = schedule.forward_backward(share, 2)
    return reads, same, from_share, from_whole, trained


def test_each_rank_reads_only_its_shards_and_the_loss_is_the_whole_batchs():
    results = run_ranks(4, _read_per_rank, None)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
    # steps 1 and 2 cover stream positions 0-15; vision's DP rank 0 takes rows 0-1 and 4-5 of each
    vision0 = sorted(order[s * 8 + r] for s in (0, 1) for r in (0, 1, 4, 5))
    vision1 = sorted(order[s * 8 + r] for s in (0, 1) for r in (2, 3, 6, 7))
    assert [r[0] for r in results] == [vision0, vision1, sorted(order[:16]), sorted(order[:16])]
    assert all(r[1] for r in results), "a DataLoader worker collated different rows"
    reference = results[0][3]
    for reads, same, from_share, from_whole, trained in results:
        assert from_share == reference and from_whole == reference
        assert trained == pytest.approx(reference["lm.loss"], rel=1e-5)
    assert 0.0 <= reference["lm.correct"] <= 1.0
