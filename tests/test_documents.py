"""Graph documents the CLI must refuse with a named error: exit code 2, one short message on
stderr naming the key, node or field, no traceback, nothing built and no process started.

Each document is a real file fed to the real CLI entry (``mimo_builder.cli.main`` in this
process; a subprocess where a pipe or the exit code of the script itself is the point).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from mimo_builder.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = pathlib.Path(sys.executable).parent / "mimo-builder"
MAMBA_LM = (ROOT / "graphs/mamba_lm.yaml").read_text()
VLM = (ROOT / "graphs/vlm.yaml").read_text()
SHORT = 1000  # characters: a named error is a few lines, never a copy of the document


def _write(tmp_path, text, name="graph.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def _refused(capsys, *argv) -> str:
    """Run the CLI on ``argv``; it must exit 2 with a short named error. Returns stderr."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err) < SHORT, err[:SHORT]
    return err


def _cli_capped(*args) -> subprocess.CompletedProcess:
    """The installed script, with 2 GiB of address space beyond what its imports take, and a timeout."""
    import resource

    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # noqa: E731
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, preexec_fn=cap)


def _line_of(text: str, needle: str, occurrence: int = 0) -> int:
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith(needle)]
    return lines[occurrence]


def _with_lm(extra: str, text: str = MAMBA_LM) -> str:
    """The mamba_lm document with ``extra`` lines added to node 'lm' (after its config)."""
    anchor = "      mamba_num_groups: 2\n"
    assert anchor in text
    return text.replace(anchor, anchor + extra, 1)


# --- files that are not documents -------------------------------------------------------------

def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = _write(tmp_path, "nodes:\n  lm: {builder: mamba\n  other: 1\n")
    err = _refused(capsys, "validate", path)
    assert path in err and "YAML" in err and "line" in err


def test_invalid_json_names_file_and_line(tmp_path, capsys):
    path = _write(tmp_path, '{"nodes": {"lm": }', "graph.json")
    err = _refused(capsys, "validate", path)
    assert path in err and "JSON" in err and "line 1" in err


def test_yaml_in_a_json_file_is_refused_as_json(tmp_path, capsys):
    path = _write(tmp_path, MAMBA_LM, "graph.json")
    err = _refused(capsys, "validate", path)
    assert "not valid JSON" in err and "line 1" in err


def test_a_folder_is_not_a_document(tmp_path, capsys):
    err = _refused(capsys, "plan", str(tmp_path), "--world-size", "1")
    assert str(tmp_path) in err and "folder" in err


def test_binary_file_is_not_utf8_text(tmp_path, capsys):
    path = _write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "graph.yaml")
    err = _refused(capsys, "render", path)
    assert "UTF-8" in err and "0x89" in err


def test_a_device_is_refused_before_reading(capsys):
    err = _refused(capsys, "validate", os.devnull)
    assert os.devnull in err and "device" in err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_an_endless_device_is_refused_without_reading(tmp_path):
    # Reading /dev/zero never ends: a subprocess under a memory cap, so a regression fails, not the machine.
    result = _cli_capped("validate", "/dev/zero")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "/dev/zero" in result.stderr and "device" in result.stderr and "Traceback" not in result.stderr


def test_a_document_above_the_size_limit_is_refused_unread(tmp_path, capsys):
    path = _write(tmp_path, MAMBA_LM + "#" + "x" * (2 << 20) + "\n")
    err = _refused(capsys, "validate", path)
    assert "1 MiB" in err


@pytest.mark.slow
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "graph.yaml"
    os.mkfifo(fifo)  # nobody ever writes: opening it for reading the usual way blocks forever
    result = _cli_capped("validate", str(fifo))
    assert result.returncode == 2, result.stderr
    assert "named pipe" in result.stderr and "Traceback" not in result.stderr


# --- YAML that expands or repeats -------------------------------------------------------------

def _laughs(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nnodes: {{lm: {{builder: mamba, config: *l{levels - 1}}}}}\n"


def test_nested_aliases_are_refused_with_a_short_message(tmp_path, capsys):
    text = _laughs(levels=6, width=10)  # kept small: without limits, each level more is 10x the memory
    assert len(text) < 600 and 10 ** 6 > 100 * len(text)  # a tiny file expanding to a million values
    err = _refused(capsys, "validate", _write(tmp_path, text))
    assert "alias" in err


def test_a_recursive_alias_is_refused(tmp_path, capsys):
    err = _refused(capsys, "validate", _write(tmp_path, "nodes: &a {lm: *a}\n"))
    assert "recursive alias" in err and "line 1" in err


def test_errors_quote_only_an_excerpt_of_large_input(tmp_path, capsys):
    big = list(range(50_000))  # placement must be a mapping: the error would quote all of it
    doc = yaml.safe_load(MAMBA_LM)
    doc["nodes"]["lm"]["placement"] = big
    err = _refused(capsys, "validate", _write(tmp_path, json.dumps(doc), "graph.json"))
    assert "nodes.lm.placement" in err and "49999" not in err


@pytest.mark.parametrize("key, extra", [
    ("placement", "    placement: {size: 1}\n    placement: {offset: 1}\n"),
    ("frozen", "    frozen: true\n    frozen: false\n"),
])
def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path, capsys, key, extra):
    text = _with_lm(extra)
    err = _refused(capsys, "validate", _write(tmp_path, text))
    first, second = _line_of(text, f"{key}:"), _line_of(text, f"{key}:", 1)
    assert f"'{key}'" in err and f"line {second}" in err and f"line {first}" in err


def test_a_second_edges_list_is_a_duplicate_key(tmp_path, capsys):
    text = VLM + "edges: []\n"  # would silently drop every edge
    err = _refused(capsys, "validate", _write(tmp_path, text))
    assert "'edges'" in err and f"line {_line_of(text, 'edges:', 1)}" in err
    assert f"line {_line_of(text, 'edges:')}" in err


def test_duplicate_json_keys_name_the_key_and_both_lines(tmp_path, capsys):
    text = json.dumps(yaml.safe_load(VLM), indent=2)
    text = text.replace('  "outputs"', '  "edges": [],\n  "outputs"')
    err = _refused(capsys, "validate", _write(tmp_path, text, "graph.json"))
    assert "'edges'" in err
    assert f"line {_line_of(text, '"edges"')}" in err and f"line {_line_of(text, '"edges"', 1)}" in err


# --- values accepted silently before ----------------------------------------------------------

def test_a_node_name_with_a_trailing_newline_is_refused(tmp_path, capsys):
    text = MAMBA_LM.replace("  lm:\n", '  "lm\\n":\n', 1)
    err = _refused(capsys, "validate", _write(tmp_path, text))
    assert "node name 'lm\\n'" in err


@pytest.mark.parametrize("name", ["training", "forward", "keys"])
def test_reserved_node_names_are_refused_before_building(tmp_path, capsys, name):
    text = MAMBA_LM.replace("  lm:\n", f"  {name}:\n", 1).replace(" lm.", f" {name}.")
    err = _refused(capsys, "validate", _write(tmp_path, text))
    assert f"'{name}'" in err and "reserved" in err


@pytest.mark.parametrize("value", ["true", '"2"', "2.0"])
def test_parallel_sizes_must_be_integers_not_coerced(tmp_path, capsys, value):
    err = _refused(capsys, "validate", _write(tmp_path, _with_lm(f"    placement: {{tp: {value}}}\n")))
    assert "nodes.lm.placement.tp" in err


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["nodes"]["lm"]["config"].update(num_layers="4"), "num_layers"),
    (lambda d: d["nodes"]["lm"]["config"].update(vocab_size=True), "vocab_size"),
    (lambda d: d.update(optimizer={"warmup_steps": True}), "warmup_steps"),
    (lambda d: d["nodes"]["lm"]["placement"].update(offset=False), "placement.offset"),
])
def test_other_integer_fields_are_strict(tmp_path, capsys, edit, field):
    doc = yaml.safe_load(MAMBA_LM)
    doc["nodes"]["lm"]["placement"] = {}
    edit(doc)
    err = _refused(capsys, "validate", _write(tmp_path, yaml.safe_dump(doc)))
    assert field in err


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["nodes"]["lm"].update(frozen="yes"), "frozen"),
    (lambda d: d["nodes"]["lm"]["config"].update(share_embeddings_and_output_weights=1),
     "share_embeddings_and_output_weights"),
])
def test_boolean_fields_are_strict(tmp_path, capsys, edit, field):
    doc = yaml.safe_load(MAMBA_LM)
    edit(doc)
    err = _refused(capsys, "validate", _write(tmp_path, yaml.safe_dump(doc)))
    assert field in err


@pytest.mark.parametrize("field", ["ep", "etp"])
def test_expert_parallelism_needs_expert_layers(tmp_path, capsys, field):
    err = _refused(capsys, "validate", _write(tmp_path, _with_lm(f"    placement: {{{field}: 2}}\n")),
                   "--world-size", "2")
    assert "node 'lm'" in err and f"placement.{field}" in err


def test_expert_parallelism_is_accepted_with_expert_layers(tmp_path, capsys):
    text = _with_lm("    placement: {ep: 2}\n").replace(  # trainable on the local spec: no expert biases
        "hybrid_layer_pattern: M*-M",
        "hybrid_layer_pattern: M*EM\n      num_experts: 4\n      transformer: {add_bias_linear: false}")
    assert main(["validate", _write(tmp_path, text), "--world-size", "2"]) == 0, capsys.readouterr().err


def test_tp_above_the_nodes_ranks_is_a_named_problem(tmp_path, capsys):
    doc = yaml.safe_load(VLM)
    doc["nodes"]["lm"]["placement"] = {"offset": 2, "size": 2, "tp": 4}  # proj feeds lm across an edge
    err = _refused(capsys, "validate", _write(tmp_path, yaml.safe_dump(doc)), "--world-size", "4")
    assert "node 'lm'" in err and "tp" in err


def test_an_output_listed_twice_is_refused(tmp_path, capsys):
    err = _refused(capsys, "validate", _write(tmp_path, MAMBA_LM + "- lm.loss\n"))
    assert "outputs[1]" in err and "lm.loss" in err


# --- the command line -------------------------------------------------------------------------

def test_run_refuses_a_graph_without_a_loss_output(tmp_path, capsys):
    import torch.distributed as dist

    path = _write(tmp_path, MAMBA_LM.replace("- lm.loss", "- lm.logits"))
    assert main(["validate", path]) == 0  # fine for inference
    capsys.readouterr()
    err = _refused(capsys, "run", path, "--steps", "1")
    assert "loss" in err and "outputs" in err
    assert not dist.is_initialized()


def test_an_empty_allow_prefix_is_a_named_error(capsys):
    err = _refused(capsys, "--allow", "", "validate", str(ROOT / "graphs/mamba_lm.yaml"))
    assert "allow" in err


@pytest.mark.parametrize("option", ["--steps", "--nproc", "--batch-size", "--microbatches"])
def test_run_counts_must_be_positive(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(ROOT / "graphs/mamba_lm.yaml"), option, "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and option in err and "Traceback" not in err


def test_schema_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([str(CLI), "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `schema | head` once head has gone: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert err == ""
