"""The mimo-builder command line, run as a user runs it (a subprocess of the installed script).

Commands that start no ranks also run in this process (``_main``: the same ``main()``, stdout
and stderr captured), which saves the seconds each new interpreter spends importing Megatron.
"""

import json
import re
import pathlib
import subprocess
import sys

import pytest
import yaml
from cli_in_process import main_in_process as _main
from cli_in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = pathlib.Path(sys.executable).parent / "mimo-builder"


def _cli(*args):
    return subprocess.run([str(CLI), *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_validate_valid_file_exits_zero():
    result = _cli("validate", "graphs/avlm.yaml", "--world-size", "4")
    assert result.returncode == 0, result.stderr
    assert "valid for 4 ranks" in result.stdout and "lm" in result.stdout


def test_validate_invalid_file_lists_errors_and_fails(tmp_path):
    bad = (ROOT / "graphs/vlm.yaml").read_text().replace("output_size: 64", "output_size: 32")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    result = _main("validate", str(path))
    assert result.returncode != 0
    assert "edge 'proj.output -> lm.image'" in result.stderr


def test_validate_accepts_python_graph_references_and_refuses_others():
    assert _main("validate", "graphs.vlm:vlm").returncode == 0
    refused = _main("validate", "os:getcwd")
    assert refused.returncode != 0 and "not under an allowed prefix" in refused.stderr


def test_plan_json_has_the_same_facts_as_the_table():
    table = _main("plan", "graphs/vlm.yaml", "--world-size", "4")
    plan = json.loads(_main("plan", "graphs/vlm.yaml", "--world-size", "4", "--json").stdout)
    assert table.returncode == 0
    assert plan["world_size"] == 4 and len(plan["ranks"]) == 4
    assert f"process groups to create: {plan['num_process_groups']}" in table.stdout
    for node in plan["nodes"]:
        assert node["name"] in table.stdout and f"{node['params']:,}" in table.stdout
    assert plan["ranks"][3]["nodes"] == {"lm": {"tp": 1, "cp": 0, "dp": 0, "pp": 0}}


def test_plan_json_stays_valid_when_megatron_logs(tmp_path):
    """At pp=2 Megatron-Core logs a deprecation warning while the plan builds on the meta
    device; stdout must still hold nothing but the JSON document."""
    doc = yaml.safe_load((ROOT / "graphs" / "mamba_lm.yaml").read_text())
    doc["nodes"]["lm"]["placement"] = {"pp": 2}
    path = tmp_path / "pp2.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _cli("plan", str(path), "--world-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["world_size"] == 2
    assert "DEPRECATION" in result.stderr  # the warning is still shown, on stderr


def test_schema_is_the_graph_json_schema():
    schema = json.loads(_main("schema").stdout)
    assert {"nodes", "edges", "inputs", "outputs"} <= set(schema["properties"])


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_render_round_trips(fmt):
    from mimo_builder._internal.document.graph import Graph

    out = _main("render", "graphs/avlm.yaml", *fmt).stdout
    parsed = Graph.from_json(out) if fmt else Graph.from_yaml(out)
    assert parsed == Graph.from_yaml((ROOT / "graphs/avlm.yaml").read_text())


def _vlm_yaml_with(tmp_path, edit):
    import yaml

    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    edit(doc)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_optimizer_settings_in_the_document_are_checked_by_node_and_field(tmp_path):
    def bad(doc):
        doc["optimizer"] = {"lr": 1e-3, "min_lr": 1e-4, "decay_style": "cosine", "mcore": {"adam_beta2": 0.95}}
        doc["nodes"]["vision"]["optimizer"] = {"lr": 1e-5}  # below the graph-wide min_lr
        doc["nodes"]["lm"]["optimizer"] = {"mcore": {"adam_beta": 0.9}}

    result = _main("validate", _vlm_yaml_with(tmp_path, bad), "--world-size", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ".nodes.lm.optimizer.mcore: unknown OptimizerConfig option 'adam_beta'" in result.stderr

    def node_lr(doc):
        doc["optimizer"] = {"lr": 1e-3, "min_lr": 1e-4}
        doc["nodes"]["vision"]["optimizer"] = {"lr": 1e-5}

    result = _main("validate", _vlm_yaml_with(tmp_path, node_lr), "--world-size", "4")
    assert result.returncode == 2
    assert "node 'vision' optimizer: Value error, min_lr 0.0001 is larger than lr 1e-05" in result.stderr


def test_run_refuses_fp16_training_before_spawning(tmp_path):
    def fp16(doc):
        doc["nodes"]["proj"]["config"]["dtype"] = "fp16"

    result = _main("run", _vlm_yaml_with(tmp_path, fp16), "--nproc", "4", "--steps", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "node 'proj' config.dtype: fp16 training needs loss scaling" in result.stderr


@pytest.mark.slow
def test_run_trains_a_pipelined_backbone_and_a_resumed_run_prints_the_same_losses(tmp_path, capfd):
    """pp=2 x vp=2 through the command line: the schedule is shown, the loss falls, each node's
    time split is printed and logged for TensorBoard. Then a run resumed from the step-2
    checkpoint prints the straight run's step 3-4 losses (weights, optimizer, schedule, data
    stream and step count all continue), and ``ckpt inspect`` describes the folder."""
    import yaml

    doc = yaml.safe_load((ROOT / "graphs/mamba_lm.yaml").read_text())
    lm = doc["nodes"]["lm"]
    lm["config"]["hybrid_layer_pattern"] = "M|*|-|M"  # one layer per virtual stage
    lm["config"]["transformer"] = {"virtual_pipeline_model_parallel_size": 2}
    lm["placement"] = {"pp": 2}
    path = tmp_path / "lm_pp2_vp2.yaml"
    path.write_text(yaml.safe_dump(doc))
    events, root = tmp_path / "tensorboard", tmp_path / "ckpt"
    common = ("run", str(path), "--nproc", "2", "--steps", "4", "--microbatches", "4", "--batch-size", "8",
              "--lr", "3e-3", "--seed", "7")
    result = run_in_process(capfd, *common, "--tensorboard", str(events), "--save", str(root),
                            "--save-interval", "2", "--peak-tflops", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Schedule: 4 stages, 4 microbatches" in result.stdout
    assert f"saved step 2 to {root}/step_0000002" in result.stdout
    losses = _losses(result.stdout)
    assert list(losses) == [1, 2, 3, 4] and float(losses[4]) < float(losses[1]), result.stdout
    split = [line for line in result.stdout.splitlines() if "ms per step fwd/bwd/comm/opt: lm " in line]
    assert len(split) == 4, result.stdout
    scalars = _tensorboard_scalars(events)
    assert [f"{v:.4f}" for _, v in scalars["train/loss"]] == list(losses.values())
    assert [s for s, _ in scalars["time_ms/lm/forward"]] == [1, 2, 3, 4]
    assert all(v > 0 for tag in ("forward", "backward", "optimizer") for _, v in scalars[f"time_ms/lm/{tag}"])
    rates = [line for line in result.stdout.splitlines() if line.startswith("    throughput (MFU ")]
    assert len(rates) == 4 and all(" lm " in line and "MFU" in line.split(" lm ")[1] for line in rates), result.stdout
    # one node on both ranks at a 0.5 TFLOP/s peak: MFU = FLOP/s per rank / peak
    per_rank, mfu = scalars["throughput/lm/tflops_per_rank"], scalars["throughput/lm/mfu"]
    assert [s for s, _ in mfu] == [1, 2, 3, 4] and scalars["train/mfu"] == mfu
    assert all(m == pytest.approx(r / 0.5) for (_, r), (_, m) in zip(per_rank, mfu))

    resumed = run_in_process(capfd, *common, "--load", str(root / "step_0000002"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert _losses(resumed.stdout) == {k: v for k, v in losses.items() if k > 2}

    shown = _main("ckpt", "inspect", str(root))
    assert shown.returncode == 0, shown.stderr
    assert "step 4, saved by 2 ranks" in shown.stdout and "step_0000002, step_0000004" in shown.stdout
    assert "model + optimizer" in shown.stdout and "32 samples consumed" in shown.stdout
    manifest = json.loads(_main("ckpt", "inspect", str(root), "--json").stdout)
    assert manifest["step"] == 4 and manifest["nodes"]["lm"]["placement"]["pp"] == 2


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _losses(stdout: str) -> dict[int, str]:
    """Step number -> printed loss, from the run's ``step N/LAST | loss X | ...`` lines."""
    return {int(line.split("|")[0].split()[1].split("/")[0]): line.split("|")[1].split()[1]
            for line in stdout.splitlines() if line.startswith("step")}


def test_checkpoint_mistakes_are_named_before_any_rank_starts(tmp_path):
    missing = _main("run", "graphs/mamba_lm.yaml", "--steps", "2", "--load", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no checkpoint at" in missing.stderr and "does not exist" in missing.stderr
    interval = _main("run", "graphs/mamba_lm.yaml", "--steps", "2", "--save", str(tmp_path), "--save-interval", "0")
    assert interval.returncode == 2 and "argument --save-interval: must be a positive integer, got '0'" in interval.stderr
    peak = _main("run", "graphs/mamba_lm.yaml", "--steps", "2", "--peak-tflops", "-3")
    assert peak.returncode == 2 and "argument --peak-tflops: must be a number above 0, got '-3'" in peak.stderr

    def hf(doc):
        doc["nodes"]["vision"]["init"] = {"hf": "openai/clip-vit-base-patch16"}
        doc["nodes"]["lm"]["init"] = {"checkpoint": str(tmp_path / "absent")}

    invalid = _main("validate", _vlm_yaml_with(tmp_path, hf))
    assert invalid.returncode == 2 and "Traceback" not in invalid.stderr
    assert "node 'vision' init.hf: 'openai/clip-vit-base-patch16' is not a folder (nothing is downloaded" in invalid.stderr
    assert f"node 'lm' init.checkpoint: '{tmp_path / 'absent'}' is not a folder" in invalid.stderr


def test_run_names_samples_and_token_counts_the_graph_cannot_take_before_any_rank_starts(tmp_path):
    """A projector whose token_reduction does not divide what its encoder brings, and samples
    longer than the backbone's seq_length, are errors naming node and field, with exit code 2,
    before any process starts (with synthetic batches and with --data)."""
    doc = yaml.safe_load((ROOT / "examples/digits_sum.yaml").read_text())
    doc["nodes"]["audio_proj"]["config"]["token_reduction"] = 4  # the audio encoder brings 2 tokens
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = ("run", str(path), "--nproc", "4", "--steps", "20", "--batch-size", "64")
    refused = "node 'audio_proj': config.token_reduction 4 does not divide the 2 tokens arriving on input"
    synthetic = _main(*run)
    assert synthetic.returncode == 2 and refused in synthetic.stderr and "Traceback" not in synthetic.stderr
    data = _main("--allow", "examples", *run, "--data", "examples.digits_sum:train_data")
    assert data.returncode == 2, data.stderr
    assert f"--data: sample 0 does not fit the graph: sample 0['audio_features'][0]: {refused}" in data.stderr

    doc["nodes"]["audio_proj"]["config"]["token_reduction"] = 2
    doc["nodes"]["lm"]["config"]["seq_length"] = 8  # prompt 4 tokens, answer 5-6 and its end
    path.write_text(yaml.safe_dump(doc))
    short = _main("--allow", "examples", *run, "--eval-data", "examples.digits_sum:held_out_data")
    assert short.returncode == 2, short.stderr
    assert "--eval-data: sample 0 does not fit the graph: sample 0: " in short.stderr
    assert "(prompt 4, answer " in short.stderr and "do not fit node 'lm' seq_length 8" in short.stderr


# --- --colocate: any graph on fewer ranks ------------------------------------------------------

@pytest.mark.parametrize("name", ["graphs/vlm.yaml", "graphs/avlm.yaml", "examples/digits_sum.yaml"])
def test_colocate_puts_every_node_on_one_rank(name):
    result = _main("--allow", "examples", "validate", name, "--colocate", "--world-size", "1")
    assert result.returncode == 0, result.stderr
    assert f"{name}: valid for 1 ranks" in result.stdout
    assert "colocate: node 'lm': tp 2 -> 1 (every node on all 1 ranks)" in result.stderr
    plan = json.loads(_main("--allow", "examples", "plan", name, "--colocate", "--world-size", "1", "--json",
                            "--no-params").stdout)
    assert all((node["offset"], node["size"], node["tp"]) == (0, 1, 1) for node in plan["nodes"]), plan["nodes"]


def test_colocate_names_the_node_and_field_that_cannot_fit():
    result = _main("plan", "graphs/avlm.yaml", "--colocate", "--world-size", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: node 'lm' placement.tp: 2 does not divide the 3 ranks left for it" in result.stderr
    result = _main("validate", "graphs/avlm.yaml", "--colocate")
    assert result.returncode == 2 and "--colocate spreads every node over the world: give its size" in result.stderr


@pytest.mark.parametrize("command, world, where", [
    ("validate", "--world-size", "placement.offset 2 is beyond the world size 2; "),
    ("run", "--nproc", "placement.offset 2 is beyond the world size 2; "),
    ("validate", "--world-size", "placement: ranks 2..3 go beyond the world size 3; lower offset or size, "),
])
def test_a_placement_beyond_the_world_suggests_its_ranks_or_colocate(command, world, where):
    size = where.split("world size ")[1][0]
    result = _main(command, "graphs/vlm.yaml", world, size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"node 'lm' {where}run on 4 ranks, or add --colocate to put every node on the {size} ranks"
            in result.stderr), result.stderr


@pytest.mark.slow
def test_run_trains_a_four_rank_graph_colocated_on_one_rank(capfd):
    result = run_in_process(capfd, "run", "graphs/avlm.yaml", "--colocate", "--nproc", "1", "--steps", "3", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "colocate: node 'lm': tp 2 -> 1" in result.stderr
    assert list(_losses(result.stdout)) == [1, 2, 3]
    assert "done: 3 steps on 1 ranks" in result.stdout


# --- bad numbers and paths, named before any rank starts --------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "x"])
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused(value):
    result = _main("run", "graphs/mamba_lm.yaml", "--lr", value)
    assert result.returncode == 2 and "argument --lr: must be a finite number > 0" in result.stderr, result.stderr


def test_a_document_learning_rate_of_inf_is_named(tmp_path):
    doc = yaml.safe_load((ROOT / "graphs/mamba_lm.yaml").read_text())
    doc["optimizer"] = {"lr": float("inf")}
    path = tmp_path / "inf.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _main("validate", str(path))
    assert result.returncode == 2 and "optimizer.lr" in result.stderr and "finite" in result.stderr, result.stderr


def test_folders_that_are_files_are_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, message in [(("--save", str(a_file / "ckpt")), f"--save {a_file}/ckpt: lies under {a_file}, which is a file"),
                          (("--save", str(a_file)), f"--save {a_file}: is a file"),
                          (("--tensorboard", str(a_file / "tb")), f"--tensorboard {a_file}/tb: lies under"),
                          (("--load", str(a_file)), f"no checkpoint at {a_file}: it is a file")]:
        result = _main("run", "graphs/mamba_lm.yaml", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = _main("ckpt", "inspect", str(a_file))
    assert result.returncode == 2 and f"no checkpoint at {a_file}: it is a file" in result.stderr


def test_allow_works_after_the_command_too():
    before = _main("--allow", "examples", "validate", "examples/custom_graph.yaml")
    after = _main("validate", "examples/custom_graph.yaml", "--allow", "examples")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout


@pytest.mark.slow
def test_traceback_shows_where_a_users_forward_failed(tmp_path, capfd):
    """A node kind whose forward raises: one line by default; with --traceback, the rank's
    traceback with the user's own file and line."""
    package = tmp_path / "mykinds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = (ROOT / "examples/custom_node.py").read_text()
    marker = "        p = self.patch_size\n"
    assert marker in source
    (package / "broken.py").write_text(source.replace(marker, '        raise ValueError("boom in my forward")\n'))
    graph = yaml.safe_load((ROOT / "examples/custom_graph.yaml").read_text())
    graph["nodes"]["encoder"]["builder"] = "mykinds.broken:PatchMLPBuilder"
    for node in graph["nodes"].values():
        node["placement"] = {}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(graph))
    common = ["--allow", "mykinds", "run", "g.yaml", "--nproc", "1", "--steps", "1", "--batch-size", "2"]
    plain = run_in_process(capfd, *common, cwd=tmp_path)
    assert plain.returncode == 2 and "boom in my forward" in plain.stderr and "Traceback" not in plain.stderr, \
        plain.stderr[-3000:]
    shown = run_in_process(capfd, "--traceback", *common, cwd=tmp_path)
    assert shown.returncode == 2, shown.stderr[-3000:]
    assert re.search(r'File ".*mykinds/broken\.py", line \d+, in forward', shown.stderr), shown.stderr[-3000:]


def test_a_backbone_too_short_for_its_modality_tokens_is_named_at_validate(tmp_path):
    """The token budget: avlm brings 17 image and 32 audio tokens to 'lm'; seq_length 20 cannot
    hold them and some text. validate says so by node and field, as run does, before any rank."""
    doc = yaml.safe_load((ROOT / "graphs/avlm.yaml").read_text())
    doc["nodes"]["lm"]["config"]["seq_length"] = 20
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(doc))
    vision, audio = doc["nodes"]["vision"]["config"], doc["nodes"]["audio"]["config"]
    image = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # patches and the class token
    sound = audio["max_frames"] // 2  # the second convolution halves the frames
    expected = (f"node 'lm' config.seq_length: 20 leaves no room for text after {image + sound} modality tokens "
                f"(image {image}, audio {sound}); it must be at least {image + sound + 2}")
    for command in (("validate", str(path)), ("run", str(path), "--nproc", "4")):
        result = _main(*command)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, \
            result.stderr


def test_an_moe_backbone_with_biases_is_named_at_validate(tmp_path):
    """MCore's local expert MLP cannot train with biases (this machine has no Transformer Engine):
    validate names the node and the option, instead of the first step failing; frozen, it passes."""
    doc = yaml.safe_load((ROOT / "graphs/mamba_lm.yaml").read_text())
    lm = doc["nodes"]["lm"]["config"]
    lm.update(hybrid_layer_pattern=lm["hybrid_layer_pattern"].replace("-", "E"), num_experts=4, impl="local")
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _main("validate", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "node 'lm' config.transformer.add_bias_linear: MCore's local expert MLP" in result.stderr, result.stderr
    doc["nodes"]["lm"]["frozen"] = True
    path.write_text(yaml.safe_dump(doc))
    assert _main("validate", str(path)).returncode == 0
    doc["nodes"]["lm"]["frozen"] = False
    lm["transformer"] = {**lm.get("transformer", {}), "add_bias_linear": False}
    path.write_text(yaml.safe_dump(doc))
    assert _main("validate", str(path)).returncode == 0
