"""Encoder load balance: the assignment, and the exchange on real gloo ranks. Items are encoded
where :func:`assign` puts them; each rank gets its own items' outputs back in order, exactly the
outputs of encoding them at home, and the gradients that flow back through the exchange add up
to the ones of encoding at home (summed over the ranks, as DDP's reduction does)."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks


def test_costliest_first_to_the_least_loaded_rank_ties_stay_home():
    from mimo_builder._internal.runtime.balance import assign

    # rank 0 holds everything: 9, 5, 4, 1, 1; rank 1 nothing, rank 2 one item of cost 4
    where = assign([[9, 5, 4, 1, 1], [], [4]])
    assert where == [[0, 1, 2, 1, 1], [], [2]]  # loads 9 | 5 + 1 + 1 = 7 | 4 + 4 = 8
    assert assign([[3], [3]]) == [[0], [1]]  # equal loads: every item stays where it is
    assert assign([[], []]) == [[], []]


def test_a_rank_that_owns_items_encodes_some_of_its_own():
    """So it knows the encoder's output dtype; checked over many random skews."""
    from mimo_builder._internal.runtime.balance import assign

    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        size = int(torch.randint(2, 6, (1,), generator=generator))
        costs = [torch.randint(1, 50, (int(torch.randint(0, 5, (1,), generator=generator)),),
                               generator=generator).tolist() for _ in range(size)]
        where = assign(costs)
        for rank, targets in enumerate(where):
            if targets:
                assert rank in [t for r in where for t in r], (costs, where)


SIZES = {0: [(1, 4), (3, 4), (6, 4), (2, 4), (5, 4)], 1: []}  # rank -> item shapes [tokens, features]


def _exchange_body():
    import torch.distributed as dist

    from mimo_builder._internal.runtime.balance import ItemExchange, balanced_encode
    from mimo_builder._internal.runtime.items import encode_grouped

    rank = dist.get_rank()
    weight = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3) / 10)
    generator = torch.Generator().manual_seed(7)
    every = {r: [torch.randn(s, generator=generator) for s in shapes] for r, shapes in SIZES.items()}
    flat, encoded_here = every[rank], []

    def encode(batch):
        encoded_here.append(batch.shape[0] * batch.shape[1])
        return batch @ weight

    exchange = ItemExchange(dist.new_group([0, 1]), tokens=lambda shape: shape[0], hidden=3)
    outputs, worked, link = balanced_encode(flat, lambda some: encode_grouped(some, encode), exchange)
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(outputs)) + link
    loss.backward()
    home = [(x @ weight).detach() for x in flat]
    return dict(outputs=[o.detach() for o in outputs], home=home, grad=weight.grad.clone(), worked=worked,
                tokens=sum(encoded_here), flat=flat)


@pytest.fixture(scope="module")
def exchanged():
    return run_ranks(2, _exchange_body)


def test_each_rank_gets_its_own_items_outputs_back_in_order(exchanged):
    for r in exchanged:
        assert len(r["outputs"]) == len(r["home"])
        for got, want in zip(r["outputs"], r["home"]):
            assert torch.allclose(got, want, atol=1e-6)


def test_the_work_is_shared_and_the_gradients_add_up(exchanged):
    # costs t (t + 18): 144, 115, 63, 40, 19 -> rank 0, 1, 1 (115 < 144), 0 (144 < 178), 1 (178 < 184)
    assert [r["tokens"] for r in exchanged] == [6 + 2, 5 + 3 + 1]
    assert all(r["worked"] for r in exchanged)
    weight = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3) / 10)
    loss = sum(((x @ weight) * (i + 1)).sum() for i, x in enumerate(exchanged[0]["flat"]))
    loss.backward()
    assert torch.allclose(exchanged[0]["grad"] + exchanged[1]["grad"], weight.grad, atol=1e-5)


def test_balanced_items_stay_home():
    from mimo_builder._internal.runtime.balance import assign

    assert assign([[5, 5], [5, 5]]) == [[0, 0], [1, 1]]  # nothing to gain: nothing moves
    assert assign([[8, 1, 1], [2]]) == [[0, 1, 1], [1]]  # 8 stays, the small ones even it out


def _stacked_and_ragged_shares():
    """DP rank 0's share stacks (one 32 px image per sample), rank 1's is ragged: both must meet
    in the node's exchange (a rank that skipped it left the other waiting in its all-gather)."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.items import Items
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.shards import RankBatch

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm("colocated_dp2"), seed=0).build_distributed_models(
        ddp_config=DistributedDataParallelConfig())
    one = {"pixel_values": torch.zeros(3, 32, 32), "prompt": "<image>", "answer": "a"}
    two = {"pixel_values": [torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)], "prompt": "<image><image>", "answer": "b"}
    share = GraphCollator(model.valid, ByteTokenizer())([one, one] if dist.get_rank() == 0 else [two, one])
    kinds = type(share["pixel_values"]).__name__
    loss = GraphSchedule(model).forward_backward(RankBatch(4, 1, share), 1)
    model.close()
    return kinds, loss


def test_a_stacked_share_and_a_ragged_share_meet_in_the_exchange():
    (kind0, loss0), (kind1, loss1) = run_ranks(2, _stacked_and_ragged_shares, timeout_s=180)
    assert (kind0, kind1) == ("Tensor", "Items")
    assert loss0 == loss1
