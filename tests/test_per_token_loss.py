"""Loss over tokens, not microbatches: the same ragged samples (loss masks of 0 to 31 tokens) give
the same loss, grad norm and updated weights at any microbatch count, DP size, packing and
placement, and the loss is the sum over the global batch's loss tokens divided by their count.

The reference is one microbatch on one rank: there the node's own mean over every loss token is
the per-token loss by definition. Tolerance: 1e-5 relative, as the other parity suites. The runs
differ only in float32 reduction order (which rows a GEMM or a sum meets together, gradients
accumulated over 1 to 4 microbatches, summed over 2 DP ranks or joined from 2 TP shards): a few
float32 roundings (6e-8 each) through a 4-layer model; measured here at most 1.7e-7 (loss),
1.6e-7 (grad norm), 7.3e-7 (weights). Weighing microbatches and DP ranks equally (the semantics
before) moved the loss by 7e-4 to 0.25 and the grad norm by 1e-2 to 0.53, relative, on this batch.
"""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from ragged_steps import ANSWERS, BATCH, check_runs

RTOL = 1e-5
SINGLE_COUNTS = (1, 2, 3, 4)  # 4: the last microbatch (samples 9-11) holds no loss token
COUNTS = (1, 2, 3)  # DP2 at 2 (samples 9-11) and at 3 (samples 10, 11): a shard without loss tokens
ONE = ("single", False, False, False)  # (graph name, packed, by rank, overlapped grad sync)
ONE_PACKED = ("single", True, False, False)


def _graph(name: str):
    """The vlm graph: on one rank, DP2, a disjoint placement (encoders DP2 on ranks 0-1, the
    backbone TP2 on ranks 2-3), or the backbone at CP2 or PP2 beside the encoders at DP2."""
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Placement

    if name in ("single", "colocated_dp2", "disjoint4"):
        return vlm(name)
    graph = vlm("colocated_dp2")
    graph.nodes["lm"].placement = Placement(cp=2) if name == "cp2" else Placement(pp=2)
    return graph


def _runs(cases, counts, initial=None):
    """``(graph name, packed, by rank, overlap)`` cases at ``counts``, one after another on this
    spawn's ranks (:func:`ragged_steps.ragged_steps`); later cases start from the first one's
    weights. Results by case."""
    from ragged_steps import ragged_steps

    out = {}
    for case in cases:
        name, packed, by_rank, overlap = case
        out[case] = ragged_steps(_graph(name), packed, counts, initial, by_rank, overlap)
        initial = out[case]["initial"]
    return out


@pytest.fixture(scope="module")
def reference():
    """One rank, one sample per row and packed, at 1 to 4 microbatches."""
    return run_ranks(1, _runs, [ONE, ONE_PACKED], SINGLE_COUNTS)[0]


def _check(results: list[dict], reference: dict, counts) -> None:
    """Every rank's loss, norm and weights at every count equal the one-rank single-microbatch step."""
    check_runs(results, reference, counts, RTOL)


def test_the_ragged_batch_is_ragged():
    per_microbatch = [sum(ANSWERS[i:i + 3]) for i in range(0, BATCH, 3)]
    assert per_microbatch == [44, 23, 37, 0]  # 4 microbatches: from none to 44 loss tokens
    assert min(a for a in ANSWERS if a) == 1


def test_each_microbatch_counts_by_its_share_of_the_loss_tokens():
    from graphs.vlm import vlm
    from mimo_builder._internal.runtime.loss_tokens import global_counts, loss_shares
    from mimo_builder._internal.runtime.shards import RankBatch
    from mimo_builder._internal.validation import validate_graph
    from ragged_steps import ragged_batch

    valid = validate_graph(vlm("single"), 1)
    batch = ragged_batch(valid, packed=False)
    assert global_counts(valid, batch) == {"lm": 104.0}
    shares = loss_shares(valid, RankBatch.from_global(valid, batch, 0, 4), 0, global_counts(valid, batch), None)
    assert shares.shares == {"lm": [44 / 104, 23 / 104, 37 / 104, 0.0]}


def test_the_default_count_is_the_mask_sum_else_the_labels_else_one_per_sample():
    from submodels.mamba import MambaBuilder
    from graphs.parts import backbone

    builder = MambaBuilder(backbone())
    mask = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    assert builder.loss_tokens({"loss_mask": mask, "labels": torch.zeros(2, 3)}, 2).tolist() == [1.5, 0.0]
    assert builder.loss_tokens({"labels": torch.zeros(2, 3, dtype=torch.long)}, 2).tolist() == [3.0, 3.0]
    assert builder.loss_tokens({}, 2).tolist() == [1.0, 1.0]


def test_mcores_own_per_token_switch_is_refused_in_a_nodes_transformer_options():
    """It would turn off DDP's mean over DP x CP, which the runtime's weights rely on."""
    from graphs.parts import backbone
    from submodels.mamba import MambaConfig

    fields = {**backbone().model_dump(), "transformer": {"calculate_per_token_loss": True}}
    with pytest.raises(ValueError, match=r"\['calculate_per_token_loss'\] are set by .* the runtime"):
        MambaConfig.model_validate(fields)


def test_any_microbatch_count_on_one_rank_gives_the_per_token_loss(reference):
    _check([reference[ONE]], reference[ONE], SINGLE_COUNTS)


def test_packed_rows_on_one_rank_give_the_per_token_loss(reference):
    _check([reference[ONE_PACKED]], reference[ONE], SINGLE_COUNTS)


def _placed(reference, nproc: int, cases) -> None:
    ranks = run_ranks(nproc, _runs, cases, COUNTS, reference[ONE]["initial"])
    for case in cases:
        _check([r[case] for r in ranks], reference[ONE], COUNTS)


def test_data_parallel_and_context_and_pipeline_parallel_backbones_give_the_per_token_loss(reference):
    """DP2 packed from each rank's own share: the global count is the sum of the shards' counts.
    DP2 with DDP's overlapped grad sync: a shard without loss tokens still runs its backward."""
    _placed(reference, 2, [("colocated_dp2", False, False, True), ("colocated_dp2", True, True, False),
                           ("cp2", False, False, False), ("pp2", False, False, False)])


def test_a_disjoint_placement_gives_the_per_token_loss_packed_or_not(reference):
    """Encoders DP2 on ranks 0-1 (no loss there), the backbone TP2 on ranks 2-3."""
    _placed(reference, 4, [("disjoint4", False, True, False), ("disjoint4", True, False, False)])
