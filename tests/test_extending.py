"""Writing a node kind outside the project (docs/extending.md): each mistake a new user made is a
named error during validation, the defaults are right or absent, messages speak the reader's
terms (CLI or Python), the schema checks node configs per kind, and the example kind trains."""

import json
import os
import pathlib
import subprocess
import sys

import jsonschema
import pytest
import torch
import yaml
from megatron.core.transformer import MegatronModule, TransformerConfig

from mimo_builder import cli
from mimo_builder._internal.kinds.builder import ModelBuilder, Port, Ports
from mimo_builder._internal.kinds.config import ModelConfig, PositiveInt
from mimo_builder._internal.errors import ConfigError, GraphError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.kinds.loading import load_graph
from mimo_builder._internal.kinds.registry import Registry, using
from mimo_builder._internal.runtime.synthetic import check_synthetic, synthetic_batch
from mimo_builder._internal.validation import validate_graph
from multirank import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = pathlib.Path(sys.executable).parent / "mimo-builder"
HERE = __name__  # the module prefix the kinds below are allowed under
EXAMPLE = "examples.custom_node:PatchMLPBuilder"


# --- node kinds with one mistake each ---------------------------------------------------------

class EncoderConfig(ModelConfig):
    builder: str = f"{HERE}:Encoder"
    """Builder of this node."""

    hidden_size: PositiveInt = 8
    """Features per output token."""


class Encoder(ModelBuilder):
    """Right: a plain torch module, no transformer config, token counts declared."""

    config_class = EncoderConfig

    def ports(self):
        return Ports.of([Port("pixel_values", ("batch", "channels", "height", "width"))],
                        [Port("embeddings", ("batch", "tokens", "hidden"), self.config.hidden_size)])

    def output_tokens(self, input_tokens):
        return {"embeddings": 4}

    def synthetic_inputs(self, batch_size, generator, tokens):
        return {"pixel_values": torch.randn((batch_size, 3, 4, 4), generator=generator)}

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        return torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(16, self.config.hidden_size))


class NoBuild(ModelBuilder):
    config_class = EncoderConfig

    def ports(self):
        return Encoder.ports(self)


class NoTokenCount(Encoder):
    output_tokens = ModelBuilder.output_tokens


class WrongTokenCount(Encoder):
    def output_tokens(self, input_tokens):
        return {"features": 4}


class NoSynthetic(Encoder):
    synthetic_inputs = ModelBuilder.synthetic_inputs


class TwoOutputs(Encoder):
    def ports(self):
        ports = Encoder.ports(self)
        return Ports({**ports.inputs}, {**ports.outputs, "pooled": Port("pooled", ("batch", "hidden"))})


class NoConfigClass(Encoder):
    config_class = ModelConfig


class BrokenPorts(Encoder):
    def ports(self):
        return {"inputs": []}


class NoCpuInit(Encoder):
    def make_transformer_config(self, pg_collection):
        return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)


def _graph(kind: str = "Encoder", placement=None, config=None) -> Graph:
    """The kind under test feeding a tiny Mamba backbone's image placeholders."""
    lm = dict(builder="mamba", num_layers=1, hidden_size=8, num_attention_heads=1, hybrid_layer_pattern="M",
              vocab_size=16, make_vocab_size_divisible_by=1, seq_length=16, mamba_state_dim=4,
              mamba_head_dim=4, mamba_num_groups=1, modality_token_ids={"image": 1})
    return (Graph().add("enc", {"builder": f"{HERE}:{kind}", **(config or {})}, placement=placement)
            .add("lm", lm).connect("enc.embeddings", "lm.image").bind("pixel_values", "enc.pixel_values")
            .bind("input_ids", "lm.input_ids").bind("labels", "lm.labels").output("lm.loss"))


def _problems(kind: str, **kwargs) -> str:
    with using(Registry((HERE,))):
        with pytest.raises(GraphError) as err:
            validate_graph(_graph(kind, **kwargs))
    return str(err.value)


def test_the_right_kind_validates_and_makes_a_synthetic_batch():
    with using(Registry((HERE,))):
        valid = validate_graph(_graph())
        batch = synthetic_batch(valid, batch_size=2)
    assert int((batch["input_ids"] == 1).sum(dim=1).unique()) == 4  # the declared token count


# --- one named error per mistake ----------------------------------------------------------------

def test_a_missing_abstract_method_names_class_and_method_not_a_type_error():
    message = _problems("NoBuild")
    assert f"node 'enc' config.builder: builder {HERE}:NoBuild does not define build_model(); a node kind defines build_model(pg_collection" in message


def test_an_output_feeding_placeholders_without_a_token_count_names_output_tokens():
    message = _problems("NoTokenCount")
    assert f"builder {HERE}:NoTokenCount of node 'enc' does not define output_tokens()" in message
    assert "lm.image has a 'tokens' axis" in message


def test_a_token_count_for_the_wrong_output_is_named_when_the_batch_is_made():
    with using(Registry((HERE,))):
        valid = validate_graph(_graph("WrongTokenCount"))
        with pytest.raises(ConfigError, match=r"WrongTokenCount.output_tokens\(\) gave no token count for \['embeddings'\]"):
            synthetic_batch(valid, batch_size=2)


def test_no_default_guesses_a_token_axis():
    with using(Registry((HERE,))):
        builder = validate_graph(_graph()).builders["lm"]
    with pytest.raises(ConfigError, match="MambaBuilder does not define output_tokens"):
        builder.output_tokens({"input_ids": 16})


def test_several_ports_without_run_name_run():
    message = _problems("TwoOutputs")
    assert f"node 'enc': builder {HERE}:TwoOutputs does not define run()" in message
    assert "['pixel_values'] -> ['embeddings', 'pooled']" in message


def test_pipeline_stages_without_run_stage_name_run_stage():
    message = _problems("Encoder", placement={"size": 2, "pp": 2})
    assert f"node 'enc' placement.pp: 2 splits the node into pipeline stages, but builder {HERE}:Encoder " \
           "does not define run_stage()" in message


def test_a_builder_without_its_own_config_class_is_named():
    message = _problems("NoConfigClass")
    assert f"builder {HERE}:NoConfigClass does not set config_class" in message


def test_ports_that_are_not_ports_are_named():
    assert f"node 'enc': {HERE}:BrokenPorts.ports() returned dict" in _problems("BrokenPorts")


def test_run_without_synthetic_inputs_is_named_before_any_rank_starts():
    with using(Registry((HERE,))):
        valid = validate_graph(_graph("NoSynthetic"))
    with pytest.raises(GraphError, match=rf"node 'enc': builder {HERE}:NoSynthetic does not define synthetic_inputs\(\)"):
        check_synthetic(valid)


def test_a_builder_key_inside_config_is_named():
    graph = _graph()
    graph.nodes["enc"].config["builder"] = "mamba"
    with using(Registry((HERE,))), pytest.raises(GraphError) as err:
        validate_graph(graph)
    assert "node 'enc' config.builder: the builder is named beside 'config'" in str(err.value)


# --- the allowlist speaks the reader's terms; --allow and import roots reach the ranks -----------

def test_the_allowlist_error_speaks_python_to_python_and_cli_to_the_cli(capsys):
    path = str(ROOT / "examples/custom_graph.yaml")
    with pytest.raises(GraphError) as err:
        validate_graph(load_graph(path))
    assert "allow_modules('examples')" in str(err.value) and "--allow" not in str(err.value)
    assert cli.main(["validate", path]) == 2
    stderr = capsys.readouterr().err
    assert "add --allow examples before the command" in stderr and "allow_modules" not in stderr


def test_the_cli_registry_is_the_commands_own(capsys, monkeypatch):
    """--allow trusts a prefix for the command only; the process's registry is unchanged after."""
    from mimo_builder._internal.kinds.registry import default_registry

    monkeypatch.chdir(ROOT)  # the CLI imports the uninstalled 'examples' from its working directory

    before = list(default_registry().prefixes)
    assert cli.main(["--allow", "examples", "validate", str(ROOT / "examples/custom_graph.yaml")]) == 0
    assert default_registry().prefixes == before


def test_train_options_carry_the_allowlist_and_import_roots(tmp_path):
    """What a spawned rank needs to resolve what the launcher resolved: the prefixes, and the
    folder an uninstalled allowed package comes from (the CLI's working directory)."""
    from mimo_builder._internal.runtime.train import TrainOptions

    package = f"mimo_ext_{os.getpid()}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "kinds.py").write_text(f"from {HERE} import Encoder\n\nclass Mine(Encoder):\n    pass\n")
    cli_registry = Registry(audience="cli", roots=[str(tmp_path)])
    cli_registry.allow(package)
    with using(cli_registry):
        options = TrainOptions()
    assert package in options.allowed_modules and options.import_roots == (str(tmp_path),)
    rank = Registry((*options.allowed_modules, HERE))  # a fresh rank, before it applies the roots
    with pytest.raises(ConfigError, match=f"cannot import module '{package}.kinds'"):
        rank.resolve_builder(f"{package}.kinds:Mine")
    rank.add_roots(*options.import_roots)
    assert rank.resolve_builder(f"{package}.kinds:Mine").__name__ == "Mine"
    assert str(tmp_path) not in sys.path


# --- building: plain modules, no transformer config, CPU initialisation --------------------------

def _build_plain_and_custom():
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu")
    layout = Layout(0, 1)
    pgs = create_process_groups([layout]).for_layout(layout)
    (ddp,) = Encoder(EncoderConfig()).build_distributed_models(pgs, DistributedDataParallelConfig())
    out = ddp(torch.randn(2, 3, 4, 4))
    out.sum().backward()
    cpu_init = NoCpuInit(EncoderConfig()).transformer_config(pgs).use_cpu_initialization
    try:
        distributed.as_megatron_module("not a module", None, pgs, Encoder.build_model)
        refused = None
    except ConfigError as err:
        refused = str(err)
    grads = [p.main_grad.abs().sum().item() for p in ddp.parameters()]
    return dict(chunk=type(ddp.module).__name__, inner=type(ddp.module.module).__name__, wrapped=isinstance(
        ddp.module, MegatronModule), shape=tuple(out.shape), grads=grads, cpu_init=cpu_init, refused=refused)


def test_a_plain_module_without_transformer_config_builds_and_trains_under_mcore_ddp():
    (result,) = run_ranks(1, _build_plain_and_custom)
    assert result["wrapped"] and result["chunk"] == "PlainModuleChunk" and result["inner"] == "Sequential"
    assert result["shape"] == (2, 3, 8) and all(g > 0 for g in result["grads"])
    assert result["cpu_init"] is True  # the user's TransformerConfig left it False: set for them on CPU
    assert "Encoder.build_model() returned str, not a torch.nn.Module" in result["refused"]


# --- per-kind schemas -------------------------------------------------------------------------

def _schema(capsys, *args, allow=()) -> dict:
    assert cli.main([*(a for prefix in allow for a in ("--allow", prefix)), "schema", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_schema_accepts_the_shipped_graphs_and_checks_node_configs_per_kind(capsys):
    validator = jsonschema.Draft202012Validator(_schema(capsys))
    for path in [*sorted(ROOT.glob("graphs/*.yaml")), ROOT / "examples/custom_graph.yaml"]:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    doc = yaml.safe_load((ROOT / "graphs/vlm.yaml").read_text())
    doc["nodes"]["lm"]["config"]["num_layers"] = "4"        # a string where MambaConfig wants an integer
    doc["nodes"]["proj"]["config"]["hidden_sise"] = 64      # a key ProjectorConfig does not have
    doc["nodes"]["vision"]["config"]["builder"] = "vision"  # the builder belongs beside config
    errors = {tuple(e.absolute_path): e.message for e in validator.iter_errors(doc)}
    assert errors[("nodes", "lm", "config", "num_layers")] == "'4' is not of type 'integer'"
    assert "'hidden_sise' was unexpected" in errors[("nodes", "proj", "config")]
    assert "'builder' was unexpected" in errors[("nodes", "vision", "config")]
    assert len(errors) == 3


def test_one_kinds_schema_describes_every_field(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    schema = _schema(capsys, "--builder", "mamba")
    assert schema["title"] == "MambaConfig" and len(schema["properties"]) > 20
    assert all(prop.get("description") for prop in schema["properties"].values())
    example = _schema(capsys, "--builder", EXAMPLE, allow=["examples"])
    assert example["title"] == "PatchMLPConfig" and all(p.get("description") for p in example["properties"].values())


def test_an_unknown_kind_names_the_known_ones(capsys):
    assert cli.main(["schema", "--builder", "mambo"]) == 2
    err = capsys.readouterr().err
    assert "unknown builder 'mambo'" in err and "audio, conformer, gpt, mamba, projector, vision" in err


# --- the example node kind trains in a graph (the one multi-rank test here) ---------------------

def test_the_example_kind_trains_in_a_graph_from_the_repository_root():
    """As a user from a clean clone: the console script (not ``python -m``), the repository root
    as working directory and nothing on PYTHONPATH (``run`` validates in the launcher first, then
    every spawned rank resolves the kind again)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([str(CLI), "--allow", "examples", "run", "examples/custom_graph.yaml", "--nproc", "2",
                          "--steps", "3", "--batch-size", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 3 steps on 2 ranks" in run.stdout
