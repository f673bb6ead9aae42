"""GraphSchedule on graphs that are not chains, and on bad input.

Parity: a diamond (one root feeding two branches that join in a two-modality backbone) and a
fan-in (two encoders on disjoint ranks feeding one backbone) give, on placements with different
DP/TP sizes, the same loss and the same synced gradients as the same graph on one rank from the
same master weights; num_microbatches=2 equals num_microbatches=1. Backbone semantics:
text-only batches, placeholder tokens without embeddings, loss_mask against cross entropy
computed here from the logits, several losses summed. Failures: bad batches are named errors on
every rank before any communication, a failure inside the backbone's forward is an error on every
rank (encoders waiting for gradients included) within seconds. Pipeline parallelism inside
nodes has its own parity tests (tests/test_pipeline.py).

Rank processes are costly on 2 cores (each imports Megatron), so a few spawned runs each hold
several independent sections; a section that raises is reported as that test's failure only.
Gradients are read after GraphOptimizer.step with MCore's SGD at lr=0: the step syncs each node's
DDP buffers into ``p.grad`` and leaves the weights as they were.
"""

from __future__ import annotations

import functools
import math
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from multirank import run_ranks

BATCH, SEED, DATA_SEED = 4, 3, 11
HID, VOCAB = 32, 64
RTOL = 1e-5
DEADLINE_S = 30.0  # an error must reach every rank within this
TOKENS = {"image": 1, "audio": 2}  # placeholder ids of the text-only backbone


# --- graphs (built inside the rank processes) -------------------------------------------------

def _lm(**modalities):
    from submodels.mamba import MambaConfig

    return MambaConfig(num_layers=2, hidden_size=HID, num_attention_heads=4, hybrid_layer_pattern="M*",
                       vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_length=96,
                       position_embedding_type="rope", mamba_state_dim=16, mamba_head_dim=16,
                       mamba_num_groups=2, modality_token_ids=modalities)


def _proj(input_size, **kwargs):
    from submodels.projector import ProjectorConfig

    return ProjectorConfig(input_size=input_size, output_size=HID, **kwargs)


def _text_bindings(graph, lm="lm", suffix=""):
    return (graph.bind(f"input_ids{suffix}", f"{lm}.input_ids").bind(f"labels{suffix}", f"{lm}.labels")
            .bind(f"loss_mask{suffix}", f"{lm}.loss_mask"))


# root (ranks 0-1, dp2) feeds left (rank 2, dp1) and right (ranks 0-3, tp2 dp2); both join in
# lm (ranks 2-3, dp2): root and lm are disjoint, and every edge changes the DP split.
DIAMOND_SPREAD = {"root": dict(offset=0, size=2), "left": dict(offset=2, size=1),
                  "right": dict(offset=0, size=4, tp=2), "lm": dict(offset=2, size=2)}
# two encoders on disjoint single ranks, the backbone on the other two at tp2
FAN_IN_SPREAD = {"enc_a": dict(offset=0, size=1), "enc_b": dict(offset=1, size=1),
                 "lm": dict(offset=2, size=2, tp=2)}
# both encoders data-parallel on ranks 0-1, the backbone on ranks 2-3 at tp2 dp1 (the demo's shape):
# each backbone rank gathers the whole batch from two DP shards and returns each its rows' gradient
FAN_IN_GATHER = {"enc_a": dict(offset=0, size=2), "enc_b": dict(offset=0, size=2),
                 "lm": dict(offset=2, size=2, tp=2)}


def _placer(spread, where):
    from mimo_builder._internal.document.graph import Placement

    return lambda name: Placement(**where[name]) if spread else Placement()


def _diamond(spread: bool):
    from mimo_builder._internal.document.graph import Graph

    at = _placer(spread, DIAMOND_SPREAD)
    graph = (Graph()
             .add("root", _proj(8, ffn_hidden_size=16), placement=at("root"))
             .add("left", _proj(HID, token_reduction=2), placement=at("left"))
             .add("right", _proj(HID, ffn_hidden_size=2 * HID), placement=at("right"))
             .add("lm", _lm(left=1, right=2), placement=at("lm"))
             .connect("root.output", "left.input").connect("root.output", "right.input")
             .connect("left.output", "lm.left").connect("right.output", "lm.right")
             .bind("x", "root.input"))
    return _text_bindings(graph).output("lm.loss")


def _fan_in(spread: bool, where: dict = FAN_IN_SPREAD):
    from mimo_builder._internal.document.graph import Graph

    at = _placer(spread, where)
    graph = (Graph()
             .add("enc_a", _proj(8), placement=at("enc_a"))
             .add("enc_b", _proj(12, token_reduction=4), placement=at("enc_b"))
             .add("lm", _lm(first=1, second=2), placement=at("lm"))
             .connect("enc_a.output", "lm.first").connect("enc_b.output", "lm.second")
             .bind("feat_a", "enc_a.input").bind("feat_b", "enc_b.input"))
    return _text_bindings(graph).output("lm.loss")


def _text_only():
    """A backbone with two modality ports and nothing connected to them."""
    from mimo_builder._internal.document.graph import Graph

    return _text_bindings(Graph().add("lm", _lm(**TOKENS))).output("lm.loss")


GRAPHS = {"diamond": _diamond, "fan_in": _fan_in}


# --- rank-side helpers ------------------------------------------------------------------------

def _build(graph, **ddp):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=SEED).build_distributed_models(
        ddp_config=DistributedDataParallelConfig(**ddp))
    return model


def _runtime(model):
    from mimo_builder._internal.document.optimizer import OptimizerSettings
    from mimo_builder._internal.runtime.optim import GraphOptimizer
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    frozen_sgd = OptimizerSettings(optimizer="sgd", lr=0.0, clip_grad=0.0, mcore={"sgd_momentum": 0.0})
    return GraphSchedule(model), GraphOptimizer(model, frozen_sgd)


def _step(schedule, optimizer, batch, num_microbatches=1):
    """Loss and global grad norm of one step; afterwards ``p.grad`` holds the synced gradient."""
    optimizer.zero_grad()
    loss = schedule.forward_backward(batch, num_microbatches=num_microbatches)
    return loss, optimizer.step().grad_norm


def _named(model, name):
    from mimo_builder._internal.assembly.tp_shard import unwrap

    return unwrap(model.chunks(name)[0]).named_parameters()


def _with_partition(param, tensor):
    """``tensor`` carrying ``param``'s TP partition attributes (so that unshard can place it)."""
    tensor = tensor.detach().clone()
    for attr in ("tensor_model_parallel", "partition_dim", "partition_sizes"):
        if hasattr(param, attr):
            setattr(tensor, attr, getattr(param, attr))
    return tensor


def _full_grads(model, shapes):
    """Each node's full (TP-gathered) gradients, returned by the node's first rank only."""
    from mimo_builder._internal.assembly.tp_shard import unshard

    out = {}
    for name in model.valid.order:
        if not model.hosts(name):
            continue
        tp = model.pg_collection(name).tp
        full = {k: unshard(_with_partition(p, p.grad), shapes[name][k].shape, tp) for k, p in _named(model, name)}
        if model.valid.layouts[name].coords(dist.get_rank()) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0}:
            out[name] = full
    return out


def _expect_error(fn, *args):
    """(exception type, message, seconds) of ``fn(*args)``; type 'none' if it returned."""
    start = time.monotonic()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the type is part of the result
        return type(err).__name__, str(err), time.monotonic() - start
    return "none", "", time.monotonic() - start


def _sections(*sections):
    """Run (name, fn, *args) sections in order; a section that raises records its traceback."""
    out = {}
    for name, fn, *args in sections:
        try:
            out[name] = fn(*args)
        except Exception:  # noqa: BLE001 - reported by the test that reads this section
            out[name] = {"section_error": f"rank {dist.get_rank()}:\n{traceback.format_exc()}"}
    return out


def _ce(model, node, ids, labels):
    """Per-token cross entropy computed here from the node's logits (run without labels)."""
    with torch.no_grad():
        logits = model.valid.builders[node].run(model.chunks(node)[0], {"input_ids": ids})["logits"]
    assert logits.shape == (*ids.shape, VOCAB), tuple(logits.shape)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(ids.shape)


# --- the one-rank run: references and backbone semantics --------------------------------------

def _reference(make_graph):
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build(make_graph(False))
    initial = {n: {k: p.detach().clone() for k, p in _named(model, n)} for n in model.valid.order}
    schedule, optimizer = _runtime(model)
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    loss, norm = _step(schedule, optimizer, batch)
    grads = _local_grads(model)
    optimizer.zero_grad()
    plain_loss = _plain_autograd(model, batch)
    optimizer.step()
    return dict(initial=initial, loss=loss, norm=norm, grads=grads,
                plain=dict(loss=plain_loss, grads=_local_grads(model)))


def _local_grads(model):
    return {n: {k: p.grad.detach().clone() for k, p in _named(model, n)} for n in model.valid.order}


def _plain_autograd(model, batch):
    """The graph's loss by one autograd pass through the composed nodes, without the schedule
    (no bridge, no detached leaves, no per-node backward); DDP's hooks collect the gradients."""
    outputs = {}
    for name in model.valid.order:
        inputs = {port: batch[key] for key, (node, port) in model.valid.inputs.items() if node == name}
        inputs.update({e.dst_port: outputs[e.src][e.src_port] for e in model.valid.edges if e.dst == name})
        outputs[name] = model.valid.builders[name].run(model.chunks(name)[0], inputs)
    ((node, port),) = model.valid.outputs
    loss = outputs[node][port]
    loss.backward()
    return float(loss)


def _text_only_and_loss_mask():
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build(_text_only())
    schedule = GraphSchedule(model)
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    ids, labels = batch["input_ids"], batch["labels"]
    ce = _ce(model, "lm", ids, labels)
    # half of each sample's positions masked, at random places
    order = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)).argsort(dim=1)
    mask = torch.zeros(ids.shape).scatter_(1, order[:, :ids.shape[1] // 2], 1.0)
    return dict(
        placeholders=sum(int((ids == t).sum()) for t in TOKENS.values()),
        text_loss=schedule.forward_backward({"input_ids": ids, "labels": labels, "loss_mask": torch.ones(ids.shape)}),
        masked_loss=schedule.forward_backward({"input_ids": ids, "labels": labels, "loss_mask": mask}),
        mean_ce=float(ce.mean()),
        masked_ce=float((ce * mask).sum() / mask.sum()),
        masked_fraction=float(1 - mask.mean()),
    )


def _two_losses():
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    graph = _text_bindings(_text_bindings(Graph().add("a", _lm()).add("b", _lm()), "a"), "b", "_b")
    model = _build(graph.output("a.loss").output("b.loss"))
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    loss = GraphSchedule(model).forward_backward(batch)
    a = _ce(model, "a", batch["input_ids"], batch["labels"])
    b = _ce(model, "b", batch["input_ids_b"], batch["labels_b"])
    return dict(loss=loss, a=float(a.mean()), b=float(b.mean()))


def _placeholders_without_embeddings(modality):
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build(_text_only())
    schedule = GraphSchedule(model)
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    ids = batch["input_ids"].clone()
    ids[1, 3:5] = TOKENS[modality]
    return _expect_error(schedule.forward_backward, {**batch, "input_ids": ids})


def _one_rank():
    return _sections(
        ("diamond", _reference, _diamond),
        ("fan_in", _reference, _fan_in),
        ("text", _text_only_and_loss_mask),
        ("two_losses", _two_losses),
        # these two abort their schedule's groups: last
        ("no_embeddings", _placeholders_without_embeddings, "audio"),
        ("second_failure", _placeholders_without_embeddings, "image"),
    )


# --- the four-rank run ------------------------------------------------------------------------

def _placed(make_graph, ref, microbatches=(1, 2), warmup=False, **ddp):
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.tp_shard import load_full_state, unwrap

    model = _build(make_graph(True), **ddp)
    for name in model.valid.order:
        if model.hosts(name):
            tp = model.pg_collection(name).tp
            load_full_state(unwrap(model.chunks(name)[0]), ref["initial"][name], tp.rank(), tp.size())
    schedule, optimizer = _runtime(model)
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    if warmup:
        _step(schedule, optimizer, batch)
    runs = {}
    for n in microbatches:
        loss, norm = _step(schedule, optimizer, batch, n)
        runs[n] = dict(loss=loss, norm=norm, grads=_full_grads(model, ref["initial"]))
    return runs


def _vlm_bad_batches():
    from graphs.vlm import vlm
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    model = _build(vlm("disjoint4"))
    schedule = GraphSchedule(model)
    good = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    out = dict(
        missing=_expect_error(schedule.forward_backward, {k: v for k, v in good.items() if k != "input_ids"}),
        narrow=_expect_error(schedule.forward_backward, {**good, "pixel_values": good["pixel_values"][..., :16]}),
    )
    # the refused batches sent nothing: a good step on the same schedule still runs
    out["good_loss"] = schedule.forward_backward(good)
    # sample 0 gains two image placeholders (more than its image's embeddings): the backbone ranks
    # fail in their forward while the encoder ranks wait for the gradients of their outputs. (Fewer
    # placeholders than rows cannot be told from ragged items' padding there; the collator counts.)
    ids = good["input_ids"].clone()
    image = model.valid.configs["lm"].modality_token_ids["image"]
    ids[0, -2:] = image
    out["miscounted"] = _expect_error(schedule.forward_backward, {**good, "input_ids": ids})
    return out


def _placed_overlap(make_graph, ref):
    return _placed(make_graph, ref, (1, 2), True, overlap_grad_reduce=True)


def _four_ranks(ref_diamond, ref_fan_in):
    return _sections(
        ("diamond", _placed, _diamond, ref_diamond),
        ("diamond_overlap", _placed_overlap, _diamond, ref_diamond),
        ("fan_in", _placed, _fan_in, ref_fan_in, (1,)),
        ("fan_in_gather", _placed, functools.partial(_fan_in, where=FAN_IN_GATHER), ref_fan_in, (1,)),
        ("vlm", _vlm_bad_batches),  # ends with a failed step (aborted groups): last
    )


# --- fixtures and test-side helpers -----------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    (result,) = run_ranks(1, _one_rank, timeout_s=240)
    return result


@pytest.fixture(scope="module")
def four_ranks(one_rank):
    refs = [_get(one_rank, name) for name in ("diamond", "fan_in")]
    return run_ranks(4, _four_ranks, *refs, timeout_s=240)


def _get(result, name):
    value = result[name]
    if isinstance(value, dict) and "section_error" in value:
        pytest.fail(f"section {name!r} raised:\n{value['section_error']}", pytrace=False)
    return value


def _sections_of(results, name):
    return [_get(r, name) for r in results]


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _assert_grads_match(grads, ref_grads, what):
    assert grads.keys() == ref_grads.keys(), (what, sorted(grads), sorted(ref_grads))
    for name, params in ref_grads.items():
        assert params.keys() == grads[name].keys(), (what, name)
        for key, expected in params.items():
            diff = float((grads[name][key] - expected).abs().max())
            scale = float(expected.abs().max())
            assert diff <= RTOL * max(scale, 1e-6), (what, name, key, diff, scale)


def _merged_grads(results, name, n):
    """Gradients of every node from the ranks that returned them, for microbatch count ``n``."""
    merged = {}
    for part in _sections_of(results, name):
        merged.update(part[n]["grads"])
    return merged


# --- 1. diamond -------------------------------------------------------------------------------

def test_reference_gradients_reach_every_node(one_rank):
    ref = _get(one_rank, "diamond")
    assert set(ref["grads"]) == {"root", "left", "right", "lm"}
    for name, grads in ref["grads"].items():
        assert any(g.abs().max() > 0 for g in grads.values()), name  # both branches carry gradient
    assert math.isfinite(ref["loss"]) and ref["norm"] > 0


@pytest.mark.parametrize("graph", ["diamond", "fan_in"])
def test_one_rank_schedule_equals_plain_autograd(one_rank, graph):
    """The reference itself: on one rank the schedule's loss and gradients equal one autograd
    pass through the composed nodes (the fan-out's two gradients summed at the root)."""
    ref = _get(one_rank, graph)
    assert _close(ref["loss"], ref["plain"]["loss"]), (ref["loss"], ref["plain"]["loss"])
    _assert_grads_match(ref["grads"], ref["plain"]["grads"], f"{graph} schedule vs autograd")


def test_diamond_on_four_ranks_matches_one_rank(one_rank, four_ranks):
    ref = _get(one_rank, "diamond")
    results = four_ranks
    runs = _sections_of(results, "diamond")
    assert all(_close(r[1]["loss"], ref["loss"]) for r in runs), ([r[1]["loss"] for r in runs], ref["loss"])
    assert all(_close(r[1]["norm"], ref["norm"]) for r in runs), ([r[1]["norm"] for r in runs], ref["norm"])
    _assert_grads_match(_merged_grads(results, "diamond", 1), ref["grads"], "diamond spread4")


# --- 2. fan-in --------------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["fan_in", "fan_in_gather"])
def test_fan_in_from_disjoint_encoders_matches_one_rank(one_rank, four_ranks, section):
    ref = _get(one_rank, "fan_in")
    results = four_ranks
    runs = _sections_of(results, section)
    assert all(_close(r[1]["loss"], ref["loss"]) for r in runs), ([r[1]["loss"] for r in runs], ref["loss"])
    _assert_grads_match(_merged_grads(results, section, 1), ref["grads"], section)


# --- 3. microbatches --------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["diamond", "diamond_overlap"])
def test_two_microbatches_equal_one(one_rank, four_ranks, section):
    """Same loss and same accumulated gradients. ``diamond_overlap`` runs every node with
    overlap_grad_reduce=True after a warm-up step (MCore's first step only counts gradients,
    so a grad sync that starts too early shows from the second step on)."""
    ref = _get(one_rank, "diamond")
    results = four_ranks
    runs = _sections_of(results, section)
    for r in runs:
        assert _close(r[2]["loss"], r[1]["loss"]) and _close(r[2]["loss"], ref["loss"]), (r[1]["loss"], r[2]["loss"])
        assert _close(r[2]["norm"], r[1]["norm"]), (section, r[1]["norm"], r[2]["norm"])
    one, two = _merged_grads(results, section, 1), _merged_grads(results, section, 2)
    _assert_grads_match(one, ref["grads"], f"{section} 1 microbatch")
    _assert_grads_match(two, one, f"{section} 2 microbatches vs 1")


# --- 4. text-only batches ---------------------------------------------------------------------

def test_text_only_batch_runs_with_modality_ports_unbound(one_rank):
    text = _get(one_rank, "text")
    assert text["placeholders"] == 0
    assert math.isfinite(text["text_loss"]) and _close(text["text_loss"], text["mean_ce"]), text


def test_placeholder_tokens_without_embeddings_name_the_modality(one_rank):
    kind, message, _ = _get(one_rank, "no_embeddings")
    assert kind == "StepError", (kind, message)
    assert "modality_token_ids['audio']" in message and "no 'audio' embeddings" in message, message


def test_a_second_step_failure_reports_its_own_cause(one_rank):
    """After a failed step, a new model and schedule fail for another reason (an 'image'
    placeholder instead of an 'audio' one): the StepError must name the new cause."""
    kind, message, _ = _get(one_rank, "second_failure")
    assert kind == "StepError", (kind, message)
    assert "modality_token_ids['image']" in message, message


# --- 5. loss_mask -----------------------------------------------------------------------------

def test_loss_mask_gives_the_masked_mean_of_cross_entropy(one_rank):
    text = _get(one_rank, "text")
    assert text["masked_fraction"] == 0.5
    assert _close(text["masked_loss"], text["masked_ce"]), text
    assert not _close(text["masked_ce"], text["mean_ce"], 1e-4), text  # the mask changes the value


def test_losses_of_two_nodes_are_summed(one_rank):
    """Graph.outputs: 'losses are summed for training'; the gradients are those of the sum, so
    the returned loss must be the sum too, also when both loss nodes share a rank."""
    losses = _get(one_rank, "two_losses")
    assert _close(losses["loss"], losses["a"] + losses["b"]), losses


# --- 6. bad input: a named error on every rank, no hang ----------------------------------------

def test_missing_bound_key_is_a_batch_error_on_every_rank(four_ranks):
    results = four_ranks
    for rank, out in enumerate(_sections_of(results, "vlm")):
        kind, message, seconds = out["missing"]
        assert kind == "BatchError", (rank, kind, message)
        assert "'input_ids'" in message and "lm.input_ids" in message, message
        assert seconds < DEADLINE_S


def test_wrong_pixel_values_width_is_a_batch_error_on_every_rank(four_ranks):
    results = four_ranks
    for rank, out in enumerate(_sections_of(results, "vlm")):
        kind, message, seconds = out["narrow"]
        assert kind == "BatchError", (rank, kind, message)
        assert "'pixel_values'" in message and "vision.pixel_values" in message, message
        assert seconds < DEADLINE_S


def test_refused_batches_leave_the_schedule_usable(four_ranks):
    results = four_ranks
    losses = [out["good_loss"] for out in _sections_of(results, "vlm")]
    assert all(math.isfinite(v) and _close(v, losses[0]) for v in losses), losses


def test_placeholder_count_mismatch_is_a_step_error_on_every_rank(four_ranks):
    results = four_ranks
    for rank, out in enumerate(_sections_of(results, "vlm")):
        kind, message, seconds = out["miscounted"]
        assert kind == "StepError", (rank, kind, message)
        # a backbone rank is the root cause, in the backbone's forward
        assert message.startswith(("rank 2, node 'lm' forward", "rank 3, node 'lm' forward")), message
        assert "modality_token_ids['image']" in message and "placeholder" in message, message
        assert seconds < DEADLINE_S, (rank, seconds)


def _vlm_valid():
    from graphs.vlm import vlm
    from mimo_builder._internal.validation import validate_graph

    return validate_graph(vlm("disjoint4"), 4)


@pytest.mark.parametrize("key", ["pixel_values", "input_ids", "labels"])
def test_check_batch_names_a_missing_bound_key(key):
    """Every key the graph binds; without 'labels' the backbone has no loss for the graph's
    'lm.loss' output."""
    from mimo_builder._internal.runtime.batch import BatchError, check_batch
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    valid = _vlm_valid()
    batch = synthetic_batch(valid, BATCH, seed=DATA_SEED)
    del batch[key]
    node, port = valid.inputs[key]
    with pytest.raises(BatchError) as err:
        check_batch(valid, batch)
    assert f"'{key}'" in str(err.value) and f"{node}.{port}" in str(err.value)


@pytest.mark.parametrize("shape", [(BATCH, 3, 32, 16), (BATCH, 3, 16, 32), (BATCH, 1, 32, 32), (BATCH, 3, 32)],
                         ids=["width", "height", "channels", "axes"])
def test_check_batch_refuses_a_wrong_pixel_values_shape(shape):
    """Every axis the vision config fixes (channels, height, width), not only the last: a wrong
    height or channel count otherwise fails inside the encoder's forward, after communication,
    with a torch size error that names neither the key nor the port."""
    from mimo_builder._internal.runtime.batch import BatchError, check_batch
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    valid = _vlm_valid()
    batch = {**synthetic_batch(valid, BATCH, seed=DATA_SEED), "pixel_values": torch.zeros(shape)}
    with pytest.raises(BatchError) as err:
        check_batch(valid, batch)
    assert "'pixel_values'" in str(err.value) and "vision.pixel_values" in str(err.value)
