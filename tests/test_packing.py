"""Sequence packing: the layout, the kernels' per-sequence restart, the checks before launch, and
the packed step against the same samples one per row (loss, grad norm, updated weights)."""

import pytest
import torch

from multirank import run_ranks
from packing_steps import LENGTHS

from mimo_builder._internal.errors import ConfigError, GraphError
from mimo_builder._internal.runtime.packing import PackedCount, Packing

# --------------------------------------------------------------------------- the layout


def test_first_fit_puts_the_longest_samples_first_and_keeps_each_row_in_sample_order():
    packing = Packing.plan(torch.tensor([3, 6, 2, 5]), width=6, row_length=8)
    # longest first: 6 -> row 0 (room 2), 5 -> row 1 (room 3), 3 -> row 1 (room 0), 2 -> row 0 (room 0)
    assert packing.rows == 2
    assert packing.seq_idx.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    tokens = torch.arange(24).view(4, 6)  # sample i's token t is 6 i + t
    assert packing.pack(tokens, fill=-1).tolist() == [[6, 7, 8, 9, 10, 11, 12, 13],
                                                      [0, 1, 2, 18, 19, 20, 21, 22]]
    assert packing.positions().tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]


def test_a_row_with_room_left_ends_in_one_padding_sequence():
    packing = Packing.plan(torch.tensor([2, 3]), width=4, row_length=8)
    assert packing.seq_idx.tolist() == [[0, 0, 1, 1, 1, 2, 2, 2]]
    assert packing.pack(torch.ones(2, 4), fill=0.0).tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    params = packing.seq_params()
    assert params.qkv_format == "sbhd" and params.cu_seqlens_q.tolist() == [0, 2, 5, 8]


def test_the_mask_is_causal_inside_each_sample_and_closed_between_samples():
    mask = Packing.plan(torch.tensor([2, 2]), width=2, row_length=4).attention_mask()[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("lengths", [[9, 2], [0, 2]])
def test_a_sample_longer_than_a_row_or_empty_is_named(lengths):
    with pytest.raises(ConfigError, match=r"node 'lm' seq_lengths\[0\] = (9|0): a sample holds 1 to 8"):
        Packing.plan(torch.tensor(lengths), width=12, row_length=8, node="lm")


def test_a_packing_counts_its_samples_rows_and_padding():
    packing = Packing.plan(torch.tensor([5, 3, 2, 4]), width=8, row_length=8)  # rows [5, 3] and [4, 2]
    assert packing.count() == PackedCount(samples=4, rows=2, tokens=14, slots=16)
    assert (packing.count() + packing.count()).line() == "packed: 8 samples into 4 rows, padding 12.5%"
    assert PackedCount().padding == 0.0


# --------------------------------------------------------------------------- the kernels


def _split_scan_case(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, head_dim, groups, state, width = 4, 8, 2, 16, 4
    dim, conv = heads * head_dim, heads * head_dim + 2 * groups * state
    f64 = dict(dtype=torch.float64, generator=g)
    weights = dict(conv1d_weight=torch.randn(conv, width, **f64), conv1d_bias=torch.randn(conv, **f64),
                   dt_bias=torch.randn(heads, **f64), A=-torch.rand(heads, **f64) - 0.1, D=torch.randn(heads, **f64),
                   chunk_size=8, headdim=head_dim, ngroups=groups)
    zxbcdt = torch.randn(1, sum(lengths), 2 * dim + 2 * groups * state + heads, **f64)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(torch.int32)[None]
    return zxbcdt, seq_idx, weights


@pytest.mark.parametrize("lengths", [[5, 37, 20, 1, 9], [8, 8, 8], [64]])
def test_a_packed_row_scans_like_its_sequences_one_by_one(lengths):
    from submodels.mamba_split_scan import split_conv1d_scan

    zxbcdt, seq_idx, weights = _split_scan_case(lengths)
    packed = split_conv1d_scan(zxbcdt, seq_idx=seq_idx, **weights)
    start = 0
    for n in lengths:
        alone = split_conv1d_scan(zxbcdt[:, start:start + n], **weights)
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=0, atol=1e-12)
        start += n


def test_the_packed_scan_restarts_the_state_and_the_convolution():
    """Without seq_idx the second sequence sees the first (so the check above can fail)."""
    from submodels.mamba_split_scan import split_conv1d_scan

    zxbcdt, seq_idx, weights = _split_scan_case([6, 6])
    joined = split_conv1d_scan(zxbcdt, **weights)
    packed = split_conv1d_scan(zxbcdt, seq_idx=seq_idx, **weights)
    torch.testing.assert_close(joined[:, :6], packed[:, :6], rtol=0, atol=1e-12)
    assert (joined[:, 6] - packed[:, 6]).abs().max() > 1e-3


def test_a_decreasing_seq_idx_is_refused():
    from submodels.mamba_kernels import causal_conv1d

    with pytest.raises(ValueError, match="must not decrease"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), seq_idx=torch.tensor([[1, 0, 0]]))


def test_ssd_packed_rows_restart_like_the_sequential_scan_per_sequence():
    """seq_idx: each sequence of a packed row is scanned from a zero state (the per-step
    recurrence in float64 on each sequence alone is the reference)."""
    from test_mamba_kernels import assert_close, run_ours, scan_inputs

    from submodels import mamba_kernels as mk

    for lengths, chunk in (([7, 20, 1, 12], 8), ([16, 16], 16), ([3, 30], 64)):
        t = scan_inputs(700, 2, sum(lengths), 4, 8, 2, 16, D="h", z=True, dt_bias=True)
        seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(torch.int32).expand(2, -1)
        y = run_ours(t, chunk, seq_idx=seq_idx)
        start = 0
        for n in lengths:
            part = {k: (v[:, start:start + n].double() if k in ("x", "dt", "B", "C", "z") else
                        (v.double() if v is not None else None)) for k, v in t.items()}
            y_ref = mk.naive_sequential_scan(part["x"], part["dt"], part["A"], part["B"], part["C"], D=part["D"],
                                             z=part["z"], dt_bias=part["dt_bias"], dt_softplus=True)
            assert_close(y[:, start:start + n], y_ref, f"sequence of {n}")
            start += n


def test_causal_conv1d_packed_rows_see_only_their_own_sequence():
    from test_mamba_kernels import assert_close, conv_ref

    from submodels import mamba_kernels as mk

    x, wt, bias = torch.randn(2, 4, 9), torch.randn(4, 3), torch.randn(4)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2]] * 2, dtype=torch.int32)
    out = mk.causal_conv1d(x, wt, bias, seq_idx=seq_idx, activation="silu")
    for start, end in ((0, 4), (4, 6), (6, 9)):
        alone = conv_ref(x[..., start:end].double(), wt.double(), bias.double(), "silu")
        assert_close(out[..., start:end], alone, f"tokens {start}-{end}")


# --------------------------------------------------------------------------- before launch


def test_packing_is_refused_by_node_and_field_on_pipeline_and_context_parallel_nodes():
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.document.graph import Placement
    from mimo_builder._internal.validation import validate_graph

    graph = mamba_lm()
    graph.nodes["lm"].placement = Placement(pp=2, cp=2)
    graph.nodes["lm"].config["transformer"] = {"sequence_parallel": True}
    with pytest.raises(GraphError) as err:
        validate_graph(graph.packed())
    text = str(err.value)
    assert "node 'lm' placement.pp: a node packing its samples (inputs bind its seq_lengths) runs with pp 1, got 2" in text
    assert "node 'lm' placement.cp:" in text and "node 'lm' config.transformer.sequence_parallel:" in text
    validate_graph(graph)  # unpacked, the same document is fine


def test_packed_binds_seq_lengths_to_the_node_that_reads_input_ids():
    from graphs.vlm import vlm

    graph = vlm("single")
    assert graph.packed().inputs["seq_lengths"] == "lm.seq_lengths"
    assert "seq_lengths" not in graph.inputs  # a copy
    del graph.inputs["input_ids"]
    with pytest.raises(ConfigError, match="exactly one node whose input_ids the batch feeds, found none"):
        graph.packed()


def test_the_collator_counts_each_samples_tokens_and_pack_needs_the_binding():
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.data.collate import GraphCollator
    from mimo_builder._internal.data.tokenizer import ByteTokenizer
    from mimo_builder._internal.validation import validate_graph

    samples = [{"prompt": "ab", "answer": "c"}, {"answer": "hello"}]
    batch = GraphCollator(validate_graph(mamba_lm().packed()), ByteTokenizer(), pack=True)(samples)
    # "ab" + "c" + end of sequence: 4 ids, 3 read; "hello" + end: 6 ids, 5 read
    assert batch["seq_lengths"].tolist() == [3, 5]
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(ConfigError, match=r"GraphCollator\(pack=True\): the graph binds no batch key to 'lm.seq_lengths'"):
        GraphCollator(validate_graph(mamba_lm()), ByteTokenizer(), pack=True)


# --------------------------------------------------------------------------- the step


def _step(graph_name, packed, initial=None, microbatches=2):
    from packing_steps import step
    from graphs.vlm import vlm

    graph = disjoint3() if graph_name == "disjoint3" else vlm(graph_name)
    return step(graph, packed, initial, microbatches)


def disjoint3():
    """vision and projector on rank 0, the backbone on ranks 1-2 with tp 2."""
    from graphs.vlm import vlm
    from mimo_builder._internal.document.graph import Placement

    graph = vlm("single")
    graph.nodes["vision"].placement = graph.nodes["proj"].placement = Placement(offset=0, size=1)
    graph.nodes["lm"].placement = Placement(offset=1, size=2, tp=2)
    return graph


@pytest.fixture(scope="module")
def one_per_row():
    return run_ranks(1, _step, "single", False)[0]


def _assert_same_step(results, reference):
    ref_loss, ref_norm, ref_updated, initial = reference
    for loss, norm, _, _ in results:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    updated = {name: params for _, _, part, _ in results for name, params in part.items()}
    assert updated.keys() == ref_updated.keys()
    for name, params in ref_updated.items():
        for key, expected in params.items():
            diff = (updated[name][key] - expected).abs().max()
            assert diff <= 1e-5 * max(expected.abs().max(), 1e-3), (name, key, float(diff))
    assert any(not torch.equal(initial["lm"][k], v) for k, v in ref_updated["lm"].items())


def test_a_packed_step_on_one_rank_matches_the_samples_one_per_row(one_per_row):
    _assert_same_step(run_ranks(1, _step, "single", True, one_per_row[3]), one_per_row)
    assert max(LENGTHS) < sum(LENGTHS) // 2  # several samples share a row of 128


def test_a_packed_step_on_a_disjoint_tensor_parallel_placement_matches(one_per_row):
    _assert_same_step(run_ranks(3, _step, "disjoint3", True, one_per_row[3]), one_per_row)


def test_a_packed_step_with_the_backbone_data_parallel_matches(one_per_row):
    """Each DP rank packs its own share; the loss is over the global batch's loss tokens, so DP 2 at
    one microbatch makes one rank's step at two, one sample per row."""
    _assert_same_step(run_ranks(2, _step, "colocated_dp2", True, one_per_row[3], 1), one_per_row)


# --------------------------------------------------------------------------- the command


def test_run_pack_trains_the_backbone_on_packed_rows(capfd):
    from cli_in_process import run_in_process

    done = run_in_process(capfd, "run", "graphs/mamba_lm.yaml", "--pack", "--steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: 2 steps on 1 ranks" in done.stdout
    assert "packed: 16 samples into 8 rows, padding 0.0%" in done.stdout  # two synthetic samples fill a row


def test_run_pack_says_how_many_rows_it_packed_and_their_padding(capfd):
    """Sixteen 5-token sums (prompt "a+b=", one digit read after it) in two steps of eight: one
    64-token row a step, 24 of its slots padding."""
    from cli_in_process import run_in_process

    done = run_in_process(capfd, "--allow", "tests.digit_sums", "run", "graphs/mamba_lm.yaml", "--pack", "--steps",
                          "2", "--data", "tests.digit_sums:train")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("packed: ") == 1, done.stdout
    assert "packed: 16 samples into 2 rows, padding 37.5%" in done.stdout


def test_run_pack_on_a_node_kind_that_cannot_pack_is_named_before_launch(tmp_path):
    from cli_in_process import main_in_process

    document = tmp_path / "gpt.yaml"
    document.write_text("nodes:\n  gpt:\n    builder: gpt\n    config: {num_layers: 1, hidden_size: 32, "
                        "num_attention_heads: 4, vocab_size: 64, seq_length: 16}\n"
                        "inputs: {input_ids: gpt.input_ids, labels: gpt.labels}\noutputs: [gpt.loss]\n")
    done = main_in_process("run", str(document), "--pack", "--steps", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "inputs.seq_lengths: node 'gpt' has no input port 'seq_lengths'" in done.stderr


def test_packing_where_mcores_mamba_training_path_cannot_run_is_named():
    """use_mamba_mem_eff_path off (as on CUDA without causal-conv1d): MCore's mixer would assert."""
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.validation import validate_graph

    graph = mamba_lm()
    graph.nodes["lm"].config["transformer"] = {"use_mamba_mem_eff_path": False}
    with pytest.raises(GraphError, match=r"node 'lm' config.transformer.use_mamba_mem_eff_path: packed rows need"):
        validate_graph(graph.packed())
    validate_graph(graph)
