"""Bad inputs named before any rank starts (issue 41): a LoRA checkpoint of other settings, LoRA
settings the node cannot take, generation limits, cost tables, output paths, the P2P timeout, and
data errors found in a loader's worker."""

import json

import pytest

from cli_in_process import main_in_process

MAMBA = dict(builder="mamba", num_layers=2, hybrid_layer_pattern="M*", hidden_size=64, num_attention_heads=4,
             vocab_size=100, make_vocab_size_divisible_by=1, seq_length=32, mamba_state_dim=16, mamba_head_dim=16,
             mamba_num_groups=2)
ALL_LAYERS = ["in_proj", "linear_proj", "linear_qkv", "out_proj"]


def _lm(lora=None, **config):
    """A one-node Mamba LM (attention and Mamba layers, unless ``config`` says otherwise), with
    ``lora`` on its node."""
    from mimo_builder._internal.document.graph import Graph

    graph = Graph().add("lm", {**MAMBA, **config}, lora=lora)
    return graph.bind("input_ids", "lm.input_ids").bind("labels", "lm.labels").output("lm.loss")


# --- 1. a LoRA checkpoint whose adapters differ from the document's lora: ----------------------

def _checkpoint(root, saved_lora, *, recorded=True, adapters_only=None, **config):
    """A step folder whose manifest says node 'lm' was saved with ``saved_lora`` (no tensors:
    the manifest is what is compared); ``recorded=False`` writes it as older builds did."""
    from mimo_builder._internal.checkpoint import files
    from mimo_builder._internal.checkpoint.lora_fit import lora_record
    from mimo_builder._internal.document.graph import NodeLora
    from mimo_builder._internal.validation import validate_graph

    valid = validate_graph(_lm(saved_lora, **config), 1)
    lora = lora_record(None if saved_lora is None else NodeLora(**saved_lora), valid.builders["lm"])
    record = files.NodeRecord(builder="mamba", placement=files.layout_record(valid.layouts["lm"]), saved=True,
                              adapters_only=saved_lora is not None if adapters_only is None else adapters_only,
                              **({"lora": lora} if recorded else {}))
    manifest = files.Manifest(step=1, world_size=1, graph=valid.graph.as_dict(), nodes={"lm": record}, seed=7)
    step = root / files.step_name(1)
    step.mkdir(parents=True)
    data = json.loads(manifest.model_dump_json())
    if not recorded:
        del data["nodes"]["lm"]["lora"]
    (step / files.MANIFEST).write_text(json.dumps(data))
    (root / files.LATEST).write_text(step.name)
    return files.read_manifest(step)


def _problems(manifest, lora):
    from mimo_builder._internal.checkpoint.checkpointer import graph_problems
    from mimo_builder._internal.validation import validate_graph

    return graph_problems(validate_graph(_lm(lora), 1), manifest, "ckpt", seed=7)


@pytest.mark.parametrize("saved, asked, message", [
    ({"rank": 4}, {"rank": 8}, "node 'lm' lora: rank 4 in the checkpoint, 8 in the document"),
    ({"rank": 4, "alpha": 8}, {"rank": 4, "alpha": 16}, "alpha 8 in the checkpoint, 16 in the document"),
    ({"rank": 4}, {"rank": 4, "alpha": 8}, "alpha 4 in the checkpoint, 8 in the document"),
    ({"rank": 4, "targets": ["linear_qkv", "in_proj"]}, {"rank": 4, "targets": ["in_proj"]},
     "targets in_proj, linear_qkv in the checkpoint, in_proj in the document"),
    ({"rank": 4, "targets": ["in_proj"]}, {"rank": 4},
     f"targets in_proj in the checkpoint, {', '.join(ALL_LAYERS)} in the document"),
])
def test_a_lora_checkpoint_of_other_settings_is_named(tmp_path, saved, asked, message):
    problems = _problems(_checkpoint(tmp_path, saved), asked)
    assert len(problems) == 1 and message in problems[0] and "lora: {rank: 4" in problems[0], problems


def test_lora_settings_that_mean_the_same_adapters_load(tmp_path):
    manifest = _checkpoint(tmp_path, {"rank": 4, "alpha": 4, "dropout": 0.1})
    assert _problems(manifest, {"rank": 4, "targets": ALL_LAYERS[::-1]}) == []  # alpha = rank; every layer


@pytest.mark.parametrize("adapters_only", [False, True])  # run --save-frozen, or the adapters alone
def test_adapters_are_not_dropped_by_a_document_without_lora(tmp_path, adapters_only):
    manifest = _checkpoint(tmp_path, {"rank": 4}, adapters_only=adapters_only)
    (problem,) = _problems(manifest, None)
    assert "node 'lm' lora: the checkpoint holds LoRA adapters (rank 4, alpha 4" in problem
    assert "a load would drop them; declare lora: {rank: 4, alpha: 4, targets: [in_proj" in problem


def test_lora_asked_of_a_checkpoint_without_adapters_is_named(tmp_path):
    (problem,) = _problems(_checkpoint(tmp_path, None), {"rank": 4})
    assert "node 'lm' lora: the checkpoint holds no LoRA adapters of the node, the document asks for rank 4" in problem


def test_a_checkpoint_from_before_the_lora_record_is_read_through_its_document(tmp_path):
    assert _problems(_checkpoint(tmp_path / "plain", None, recorded=False), None) == []
    old = _checkpoint(tmp_path / "lora", {"rank": 4, "alpha": 8}, recorded=False)
    assert _problems(old, {"rank": 4, "alpha": 8}) == []
    (problem,) = _problems(old, {"rank": 4, "alpha": 2})
    assert "alpha 8 in the checkpoint, 2 in the document" in problem


@pytest.mark.parametrize("command", ["run", "generate", "export"])
def test_each_command_that_loads_names_other_lora_settings_before_any_rank(tmp_path, command):
    mamba_only = dict(hybrid_layer_pattern="MM", vocab_size=260)  # exportable; reads the digits' bytes
    _checkpoint(tmp_path / "ckpt", {"rank": 4, "alpha": 8}, **mamba_only)
    doc = tmp_path / "lm.yaml"
    doc.write_text(_lm({"rank": 4, "alpha": 16}, **mamba_only).to_yaml())
    extra = {"run": ["--steps", "2"], "generate": ["--data", "examples.digits_sum:held_out_data"],
             "export": ["-o", str(tmp_path / "out")]}[command]
    result = main_in_process("--allow", "examples", command, str(doc), "--load", str(tmp_path / "ckpt"), *extra)
    assert result.returncode == 2, result
    assert "node 'lm' lora: alpha 8 in the checkpoint, 16 in the document" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- 2. lora: settings the node cannot take ------------------------------------------------------

@pytest.mark.parametrize("lora, message", [
    ({"rank": 4, "targets": ["in_proj", "out_proj", "in_proj"]},
     "node 'lm' lora.targets: 'in_proj' listed more than once; list each layer once"),
    ({"rank": 65}, "node 'lm' lora.rank: 65 is larger than the smaller side of in_proj (64 in, 328 out), "
                   "linear_proj (64 in, 64 out), linear_qkv (64 in, 192 out), out_proj (128 in, 64 out)"),
    ({"rank": 100, "targets": ["out_proj"]}, "lower rank to 64 or leave these layers out of lora.targets"),
])
def test_lora_settings_the_node_cannot_take_are_named_at_validate(tmp_path, lora, message):
    doc = tmp_path / "lm.yaml"
    doc.write_text(_lm(lora).to_yaml())
    result = main_in_process("validate", str(doc))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_lora_rank_up_to_the_layers_smaller_side_is_valid():
    from mimo_builder._internal.validation import validate_graph

    validate_graph(_lm({"rank": 64}))  # every layer has 64 features on its smaller side


# --- 3. generation limits and seeds --------------------------------------------------------------

DIGITS = ["--allow", "examples", "generate", "examples/digits_sum.yaml", "--colocate", "--nproc", "1",
          "--data", "examples.digits_sum:held_out_data"]


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "1000000"], "generate --max-new-tokens 1000000: node 'lm' holds sequences of at most "
                                      "config.seq_length 12 tokens, the prompt's included; give at most 12"),
    (["--samples", "298"], "generate --samples 298: the --data dataset has 297 samples; give at most 297"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**64 - 1"),
    (["--seed", str(2**64)], "argument --seed: must be an integer from 0 to 2**64 - 1"),
])
def test_generation_requests_beyond_the_model_or_the_data_are_named_before_any_rank(tmp_path, args, message):
    result = main_in_process(*DIGITS, "--load", str(tmp_path / "none"), *args)  # named before the checkpoint
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_without_max_new_tokens_generation_stays_within_seq_length():
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.runtime.generate_command import DEFAULT_NEW_TOKENS, _max_new_tokens
    from mimo_builder._internal.validation import validate_graph

    short = validate_graph(Graph().add("lm", {**MAMBA, "seq_length": 16}).bind("input_ids", "lm.input_ids"), 1)
    long = validate_graph(mamba_lm(), 1)  # seq_length 64
    assert (_max_new_tokens(short, "lm", None), _max_new_tokens(long, "lm", None)) == (16, DEFAULT_NEW_TOKENS)
    assert _max_new_tokens(short, "lm", 16) == 16


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1e3"])
def test_a_run_seed_outside_what_generators_take_is_named(seed):
    result = main_in_process("run", "graphs/mamba_lm.yaml", "--seed", seed)
    assert result.returncode == 2 and "argument --seed: must be an integer from 0 to 2**64 - 1" in result.stderr


@pytest.mark.slow
def test_the_largest_seed_trains(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from cli_in_process import ROOT

    cli = Path(sys.executable).parent / "mimo-builder"
    result = subprocess.run([str(cli), "run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", "1", "--batch-size",
                             "2", "--seed", str(2**64 - 1)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "done: 1 steps" in result.stdout, result.stderr[-2000:]


# --- 4. cost tables and the placements they cannot predict ---------------------------------------

def _costs(path, names=("lm",), tps=(1,), **fields):
    """A cost table file with equal costs for ``names`` at ``tps``; ``fields`` overwrite its JSON."""
    from mimo_builder._internal.planning.cost_table import CostTable, Linear, NodeCosts

    node = NodeCosts(forward=Linear(fixed=0.02), backward=Linear(fixed=0.04))
    data = json.loads(CostTable(nodes={n: {tp: node for tp in tps} for n in names}).model_dump_json())
    data.update(fields)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("fields, message", [
    ({"nodes": {"lm": {"1": {"forward": {"fixed": float("nan")}, "backward": {}}}}},
     "nodes.lm.1.forward.fixed: Input should be a finite number (got nan)"),
    ({"nodes": {"lm": {"1": {"forward": {}, "backward": {"per_row": -0.5}}}}},
     "nodes.lm.1.backward.per_row: Input should be greater than or equal to 0 (got -0.5)"),
    ({"link": {"latency": -1}}, "link.latency: Input should be greater than or equal to 0 (got -1)"),
    ({"nodes": {"lm": {"0": {"forward": {}, "backward": {}}}}},
     "nodes: node 'lm' at tp=0: a tensor-parallel size is at least 1"),
])
@pytest.mark.parametrize("command", ["plan", "place"])
def test_a_cost_table_with_impossible_numbers_is_named(tmp_path, command, fields, message):
    costs = _costs(tmp_path / "costs.json", **fields)
    extra = ["--no-params"] if command == "plan" else []
    result = main_in_process(command, "graphs/mamba_lm.yaml", "--world-size", "1", "--costs", costs, *extra)
    assert result.returncode == 2 and f"--costs {costs}: {message}" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["plan", "place"])
def test_a_cost_table_of_another_graph_is_named(tmp_path, command):
    costs = _costs(tmp_path / "costs.json")  # graphs/mamba_lm's node only
    extra = ["--no-params"] if command == "plan" else []
    result = main_in_process(command, "graphs/avlm.yaml", "--world-size", "4", "--costs", costs, *extra)
    assert result.returncode == 2, result
    assert (f"--costs {costs}: the cost table has no costs of node(s) 'vision', 'vision_proj', 'audio', 'audio_proj' "
            "(it holds 'lm'); it was measured for another graph") in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "6", "--microbatches", "4"], "batch size 6 is not divisible by 4 microbatch(es)"),
    (["--batch-size", "4", "--microbatches", "4"],
     "microbatch size 1 (batch size 4 / 4 microbatches) is not divisible by node 'vision' data-parallel size 2"),
])
def test_plan_costs_refuse_a_batch_that_does_not_split_over_the_placement(tmp_path, args, message):
    costs = _costs(tmp_path / "costs.json", names=("vision", "vision_proj", "audio", "audio_proj", "lm"))
    result = main_in_process("plan", "graphs/avlm.yaml", "--world-size", "4", "--no-params", "--costs", costs, *args)
    assert result.returncode == 2 and "--batch-size / --microbatches:" in result.stderr, result.stderr
    assert message in result.stderr and "predicted step" not in result.stdout, result.stderr


@pytest.mark.parametrize("world, tps, batch, message", [
    ("4", (1,), "2", "5 (placement, M) pair(s) do not split a batch of 2, e.g. colocated tp=1 dp=4, M=1: microbatch size 2 "
                     "(batch size 2 / 1 microbatches) is not divisible by node 'lm' data-parallel size 4"),
    ("8", (8,), "8", "1 placement(s) do not validate, e.g. colocated tp=8 dp=1: node 'lm' placement.tp: "
                     "num_attention_heads 4 is not divisible by tp 8"),
    ("3", (2,), "8", "no candidate shape: a measured TP size (2) must divide the 3 ranks"),
])
def test_place_names_why_no_placement_fits_the_world(tmp_path, world, tps, batch, message):
    costs = _costs(tmp_path / "costs.json", tps=tps)
    result = main_in_process("place", "graphs/mamba_lm.yaml", "--world-size", world, "--costs", costs,
                             "--batch-size", batch)
    assert result.returncode == 2, result
    assert f"no placement of the graph on {world} ranks runs {batch} samples per step" in result.stderr
    assert message in result.stderr, result.stderr


# --- 5. an export that exports nothing; output paths ---------------------------------------------

def test_an_export_of_nodes_without_a_hugging_face_counterpart_is_refused_before_any_rank(tmp_path):
    from mimo_builder._internal.document.graph import Graph

    doc = tmp_path / "proj.yaml"
    graph = Graph().add("proj", {"builder": "projector", "input_size": 8, "output_size": 8, "projector_type": "affine"})
    doc.write_text(graph.bind("input", "proj.input").output("proj.output").to_yaml())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "none"), "-o", str(tmp_path / "out"),
                             "--nproc", "1")
    assert result.returncode == 2, result
    assert ("export: no node of the graph can be exported:\n  - node 'proj': LLaVA's projector is a two-layer MLP "
            "without token merging; the node has projector_type='affine'") in result.stderr, result.stderr


AUDIO = dict(builder="audio", num_layers=1, hidden_size=32, num_attention_heads=2, n_mels=8, max_frames=4)


def _audio():
    from mimo_builder._internal.document.graph import Graph

    graph = Graph().add("audio", AUDIO)
    return graph.bind("audio_features", "audio.features").output("audio.embeddings")


def _save_audio_with_a_key_bias(root: str) -> None:
    """A checkpoint whose audio node has a key bias (as training gives it), which Whisper cannot hold."""
    import torch

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_audio(), seed=4).build_distributed_models(wrap_with_ddp=False)
    with torch.no_grad():
        for name, p in model.chunks("audio")[0].named_parameters():
            if name.endswith("linear_qkv.bias"):
                p.fill_(0.5)
    Checkpointer(model).save(root, 1)
    model.close()


@pytest.mark.slow
def test_an_export_whose_every_node_is_skipped_at_its_weights_exits_non_zero_naming_why(tmp_path):
    from multirank import run_ranks

    run_ranks(1, _save_audio_with_a_key_bias, str(tmp_path / "ckpt"))
    doc = tmp_path / "audio.yaml"
    doc.write_text(_audio().to_yaml())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result
    assert "export: no node of the graph can be exported:\n  - node 'audio': " in result.stderr, result.stderr
    assert "the key bias is not zero" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("command, target, message", [
    (["export", "graphs/mamba_lm.yaml", "--load", "none"], "/sys/mimo_builder_out", "cannot write in /sys"),
    (["export", "graphs/mamba_lm.yaml", "--load", "none"], "FILE/out", "lies under {tmp}/FILE, which is a file"),
    (["place", "graphs/mamba_lm.yaml", "--world-size", "1", "--costs", "none.json"], "DIR", "is a folder"),
    (["place", "graphs/mamba_lm.yaml", "--world-size", "1", "--costs", "none.json"], "no/best.yaml",
     "its folder {tmp}/no does not exist"),
    (["profile", "graphs/mamba_lm.yaml"], "/sys/costs.json", "cannot write in /sys"),
    (["profile", "graphs/mamba_lm.yaml"], "FILE/costs.json", "its folder {tmp}/FILE is a file"),
])
def test_an_output_path_that_cannot_be_written_is_named_before_the_work(tmp_path, command, target, message):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    output = target if target.startswith("/") else str(tmp_path / target)
    result = main_in_process(*command, "-o", output)
    assert result.returncode == 2 and f"error: -o {output}: " in result.stderr, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr and "profiled" not in result.stderr, result.stderr


# --- 6. the strict point-to-point timeout --------------------------------------------------------

@pytest.mark.parametrize("mode, value", [("strict", "abc"), ("strict", "0"), ("strict", "-5"), ("strict", "nan"),
                                         ("", "ten")])
def test_a_bad_p2p_timeout_is_named_at_launch_before_any_rank(monkeypatch, mode, value):
    monkeypatch.setenv("MIMO_BUILDER_P2P", mode)
    monkeypatch.setenv("MIMO_BUILDER_P2P_TIMEOUT", value)
    result = main_in_process("run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", "1", "--batch-size", "2")
    assert result.returncode == 2, result
    assert f"error: MIMO_BUILDER_P2P_TIMEOUT={value!r}: must be a positive number of seconds" in result.stderr
    assert "rank 0" not in result.stderr, result.stderr


# --- 7. data errors found while the run reads ----------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("item5_raises", "DataError: dataset item 5: reading it raised RuntimeError: the shard is gone"),
    ("item5_integer", "DataError: dataset item 5['answer'] is of type int, not text (str)"),
    ("item5_out_of_vocabulary", "DataError: dataset item 5: batch['input_ids'] for lm.input_ids: values must be "
                                "[0, 256) (token ids in [0, vocab_size)), found min 0, max 257"),
])
def test_a_bad_dataset_item_read_by_a_worker_is_named_by_its_index(name, message):
    result = main_in_process("--allow", "tests.bad_data", "run", "graphs/mamba_lm.yaml", "--nproc", "1", "--steps", "2",
                             "--batch-size", "4", "--data", f"tests.bad_data:{name}")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "worker" not in result.stderr, result.stderr


def test_every_sample_of_a_chunk_is_checked_against_the_vocabulary():
    from mimo_builder._internal.data import ByteTokenizer, DataError, GraphCollator
    from mimo_builder._internal.validation import validate_graph

    collate = GraphCollator(validate_graph(_lm()), ByteTokenizer(reserved=60))  # vocab_size 100: bytes below 40
    fine, outside = {"prompt": "!!", "answer": "#"}, {"prompt": "!!", "answer": "A"}  # 'A' is 65: id 125
    assert collate.checked([fine, fine], ["dataset item 0", "dataset item 1"])["input_ids"].shape == (2, 32)
    with pytest.raises(DataError, match=r"^dataset item 7: batch\['input_ids'\] for lm.input_ids: values must be "
                                        r"\[0, 100\)"):
        collate.checked([fine, fine, outside], ["dataset item 3", "dataset item 0", "dataset item 7"])


def _packed_step_with_an_empty_sample() -> str:
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.errors import MimoError
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch

    compat.init_runtime("cpu")
    builder = CompositeBuilder(mamba_lm().packed())
    (model,) = builder.build_distributed_models(ddp_config=DistributedDataParallelConfig())
    batch = synthetic_batch(model.valid, 2)
    batch["seq_lengths"][1] = 0
    try:
        GraphSchedule(model).forward_backward(batch)
    except MimoError as err:
        return str(err)
    finally:
        model.close()
    return "no error"


def test_a_sample_packing_cannot_take_names_the_node():
    from multirank import run_ranks

    (message,) = run_ranks(1, _packed_step_with_an_empty_sample)
    assert "node 'lm' seq_lengths[1] = 0: a sample holds 1 to 32 tokens" in message and "'?'" not in message, message


def test_place_names_placements_the_memory_limit_leaves_out(tmp_path):
    costs = _costs(tmp_path / "costs.json")
    result = main_in_process("place", "graphs/mamba_lm.yaml", "--world-size", "1", "--costs", costs,
                             "--gpu-memory", "1KiB")
    assert result.returncode == 2, result
    assert "4 (placement, M) pair(s) exceed --gpu-memory 1.02 kB per rank, e.g. colocated tp=1 dp=1, M=1: " \
        in result.stderr, result.stderr
