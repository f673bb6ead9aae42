"""Batch dtype and value checks: every bound key against its port's declared dtype and bounds,
before a step starts (single process, no groups; one test runs the real schedule on one rank)."""

import pytest
import torch

from multirank import run_ranks

BATCH = 4


def _valid(name="vlm", world=4):
    from mimo_builder._internal.validation import validate_graph

    if name == "vlm":
        from graphs.vlm import vlm as make
    elif name == "avlm":
        from graphs.avlm import avlm as make
    else:
        from graphs.mamba_lm import mamba_lm as make
    return validate_graph(make(), world)


def _batch(valid, **replace):
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    return {**synthetic_batch(valid, BATCH, seed=5), **replace}


def _refused(valid, batch) -> str:
    from mimo_builder._internal.runtime.batch import BatchError, check_batch

    with pytest.raises(BatchError) as err:
        check_batch(valid, batch)
    return str(err.value)


def _vocab(valid, key):
    node, _ = valid.inputs[key]
    return valid.configs[node].vocab_size


@pytest.mark.parametrize("name", ["vlm", "avlm", "mamba_lm"])
def test_synthetic_batches_of_the_shipped_graphs_pass(name):
    from mimo_builder._internal.runtime.batch import check_batch

    valid = _valid(name)
    assert check_batch(valid, _batch(valid)) == BATCH


@pytest.mark.parametrize("key,dtype", [("input_ids", torch.float32), ("labels", torch.float32),
                                       ("labels", torch.bool), ("pixel_values", torch.float64),
                                       ("pixel_values", torch.int64), ("audio_features", torch.float16)])
def test_a_wrong_dtype_names_key_port_expected_and_found(key, dtype):
    valid = _valid("avlm" if key == "audio_features" else "vlm")
    good = _batch(valid)
    node, port = valid.inputs[key]
    message = _refused(valid, {**good, key: good[key].to(dtype)})
    line = next(line for line in message.splitlines() if f"batch[{key!r}]" in line)
    assert f"{node}.{port}" in line and f"found {dtype}" in line, message
    expected = "torch.int64 or torch.int32" if good[key].dtype == torch.int64 else "torch.float32"
    assert expected in line, message


def test_int32_ids_and_bool_or_int_loss_masks_are_accepted():
    from mimo_builder._internal.runtime.batch import check_batch

    valid = _valid("vlm")
    good = _batch(valid)
    for mask_dtype in (torch.bool, torch.int64, torch.float64):
        batch = {**good, "input_ids": good["input_ids"].int(), "labels": good["labels"].int(),
                 "loss_mask": good["loss_mask"].to(mask_dtype)}
        assert check_batch(valid, batch) == BATCH


@pytest.mark.parametrize("key,value", [("input_ids", "vocab"), ("labels", "vocab"), ("labels", -100),
                                       ("input_ids", -1)])
def test_ids_outside_the_vocabulary_name_the_range(key, value):
    """Labels have no ignore value (the loss masks with loss_mask): -100 is out of range too."""
    valid = _valid("vlm")
    good = _batch(valid)
    vocab = _vocab(valid, key)
    bad_value = vocab if value == "vocab" else value
    ids = good[key].clone()
    ids[1, 2] = bad_value
    message = _refused(valid, {**good, key: ids})
    node, port = valid.inputs[key]
    low, high = min(int(good[key].min()), bad_value), max(int(good[key].max()), bad_value)
    assert f"batch[{key!r}] for {node}.{port}: values must be [0, {vocab})" in message, message
    assert f"found min {low}, max {high}" in message, message


def test_position_ids_are_bounded_by_a_learned_position_table_only():
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.runtime.batch import check_batch
    from mimo_builder._internal.validation import validate_graph
    from submodels.mamba import MambaConfig

    rope = _valid("mamba_lm", 1)
    config = MambaConfig(**{**mamba_lm().nodes["lm"].config, "position_embedding_type": "learned_absolute"})
    seq = config.seq_length
    graph = Graph().add("lm", config).output("lm.loss")
    for key in ("input_ids", "position_ids", "labels", "loss_mask"):
        graph = graph.bind(key, f"lm.{key}")
    learned = validate_graph(graph, 1)
    good = _batch(rope)
    far = good["position_ids"] + seq  # beyond the table, still >= 0
    assert check_batch(rope, {**good, "position_ids": far}) == BATCH
    message = _refused(learned, {**good, "position_ids": far})
    assert f"batch['position_ids'] for lm.position_ids: values must be [0, {seq})" in message, message
    assert f"max {int(far.max())}" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_counted(bad):
    valid = _valid("vlm")
    good = _batch(valid)
    pixels = good["pixel_values"].clone()
    pixels[0, 0, 0, :3] = bad
    mask = good["loss_mask"].clone()
    mask[2, 1] = bad
    message = _refused(valid, {**good, "pixel_values": pixels, "loss_mask": mask})
    assert f"batch['pixel_values'] for vision.pixel_values: 3 of {pixels.numel()} values are not finite" in message
    assert f"batch['loss_mask'] for lm.loss_mask: 1 of {mask.numel()} values are not finite" in message


@pytest.mark.parametrize("key", ["labels", "loss_mask"])
def test_token_ports_must_have_the_shape_of_input_ids(key):
    valid = _valid("vlm")
    good = _batch(valid)
    short = good[key][:, :-1]
    message = _refused(valid, {**good, key: short})
    assert (f"batch[{key!r}] for lm.{key}: shape {tuple(short.shape)} must equal batch['input_ids']'s "
            f"{tuple(good['input_ids'].shape)}") in message, message


def test_every_problem_is_listed_at_once():
    valid = _valid("vlm")
    good = _batch(valid)
    labels = good["labels"].clone()
    labels[0, 0] = -1
    message = _refused(valid, {**good, "input_ids": good["input_ids"].float(),
                               "pixel_values": good["pixel_values"].double(), "labels": labels})
    assert len(message.splitlines()) == 1 + 3, message


@pytest.mark.parametrize("node_dtype", ["fp32", "bf16"])
def test_float_inputs_may_be_float32_or_the_nodes_own_dtype(node_dtype):
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.runtime.batch import check_batch
    from mimo_builder._internal.validation import validate_graph
    from submodels.vision import VisionConfig

    config = VisionConfig(num_layers=1, hidden_size=32, num_attention_heads=4, image_size=16, patch_size=8,
                          dtype=node_dtype)
    valid = validate_graph(Graph().add("enc", config).bind("images", "enc.pixel_values").output("enc.embeddings"), 1)
    pixels = torch.randn(2, 3, 16, 16)
    assert check_batch(valid, {"images": pixels}) == 2
    if node_dtype == "bf16":
        assert check_batch(valid, {"images": pixels.bfloat16()}) == 2
    else:
        message = _refused(valid, {"images": pixels.bfloat16()})
        assert "batch['images'] for enc.pixel_values: expected a floating tensor (torch.float32), " \
               "found torch.bfloat16" in message, message


# --- the real step: refused before it starts ------------------------------------------------

def _refuse_then_step():
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.batch import BatchError
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    device = compat.init_runtime("cpu")
    (model,) = CompositeBuilder(mamba_lm(), seed=1).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    schedule = GraphSchedule(model, device=device)
    batch = synthetic_batch(model.valid, 2, seed=1)
    try:
        schedule.forward_backward({**batch, "labels": batch["labels"].float()})
        refused = None
    except BatchError as err:
        refused = str(err)
    failed_after_refusal = schedule.failed  # a failure inside the step would mark the schedule failed
    return refused, failed_after_refusal, schedule.forward_backward(batch)


def test_the_schedule_refuses_float_labels_before_the_step():
    refused, failed_after_refusal, loss = run_ranks(1, _refuse_then_step)[0]
    assert refused is not None and "batch['labels'] for lm.labels" in refused and "found torch.float32" in refused
    assert failed_after_refusal is None  # refused before the step started, not inside it
    assert loss == loss and loss > 0  # the schedule still runs a good batch
