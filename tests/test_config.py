"""ModelConfig: builder references, strict keys, MCore option checks, hooks, lossless round trips."""

import json
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimo_builder._internal.kinds import registry
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.errors import ConfigError
from submodels.gpt import GPTBuilder, GPTConfig

GPT = {"builder": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
       "vocab_size": 100, "seq_length": 16}


@registry.register_hook("test.identity")
def identity_hook(chunks):
    return chunks


@pytest.fixture
def restore_allowlist():
    """Tests that widen the allowlist do it in a registry of their own."""
    with registry.using(registry.default_registry().derive()):
        yield


def test_a_dict_alone_rebuilds_the_right_subclass():
    config = ModelConfig.from_dict(GPT)
    assert type(config) is GPTConfig
    assert isinstance(config.make_builder(), GPTBuilder)


def test_builders_are_registered_through_entry_points():
    assert "gpt" in registry.registered_names()


def test_unknown_key_names_key_class_and_suggestion():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**GPT, "hidden_sise": 8})
    message = str(err.value)
    assert "'hidden_sise'" in message and "GPTConfig" in message and "'hidden_size'" in message


def test_unknown_transformer_option_suggests_closest_fields():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**GPT, "transformer": {"layernorm_epsilom": 1e-5}})
    assert "'layernorm_epsilom'" in str(err.value) and "'layernorm_epsilon'" in str(err.value)


def test_transformer_option_value_is_type_checked():
    with pytest.raises(ConfigError, match="add_bias_linear"):
        ModelConfig.from_dict({**GPT, "transformer": {"add_bias_linear": "sometimes"}})


def test_options_owned_by_fields_or_placement_are_refused_in_passthrough():
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        ModelConfig.from_dict({**GPT, "transformer": {"tensor_model_parallel_size": 2}})


def test_every_error_is_reported_with_its_location():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**GPT, "hidden_size": -1, "extra": 1}, where="nodes.lm.config")
    lines = str(err.value).splitlines()
    assert any(line.startswith("nodes.lm.config.hidden_size") for line in lines)
    assert any(line.startswith("nodes.lm.config.extra") for line in lines)


def test_unknown_builder_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown builder 'mambo'.*gpt"):
        ModelConfig.from_dict({**GPT, "builder": "mambo"})


def test_references_outside_the_allowlist_are_refused_before_import():
    os.environ.pop("MIMO_TEST_MARK_IMPORTED", None)
    for ref in ("os:system", "mark_on_import:NotABuilder"):
        with pytest.raises(ConfigError, match="not under an allowed prefix"):
            ModelConfig.from_dict({**GPT, "builder": ref})
    assert "mark_on_import" not in sys.modules
    assert "MIMO_TEST_MARK_IMPORTED" not in os.environ


def test_allowlisted_reference_must_be_a_model_builder(restore_allowlist):
    registry.allow_modules("mark_on_import")
    with pytest.raises(ConfigError, match="not a subclass of mimo_builder._internal.kinds.builder.ModelBuilder"):
        ModelConfig.from_dict({**GPT, "builder": "mark_on_import:NotABuilder"})
    assert os.environ.get("MIMO_TEST_MARK_IMPORTED") == "1"  # now it was imported, on purpose


def test_module_class_reference_round_trips():
    config = ModelConfig.from_dict({**GPT, "builder": "submodels.gpt:GPTBuilder"})
    assert type(config) is GPTConfig
    assert ModelConfig.from_dict(config.as_dict()) == config


def test_hooks_resolve_in_declared_order_and_serialize_by_name():
    def local(chunks):
        return chunks

    config = ModelConfig.from_dict({**GPT, "pre_wrap_hooks": ["test.identity"]})
    config.post_wrap_hooks = [identity_hook]
    assert config.resolved_hooks("pre_wrap_hooks") == [identity_hook]
    assert config.as_dict()["post_wrap_hooks"] == ["test.identity"]
    config.post_wrap_hooks = [identity_hook, local]
    with pytest.raises(ConfigError, match="not serializable"):
        config.as_dict()


def test_json_schema_documents_every_field():
    schema = GPTConfig.json_schema()
    assert set(GPTConfig.model_fields) == set(schema["properties"])
    assert all(prop.get("description") for prop in schema["properties"].values())


def test_yaml_loading_is_safe():
    with pytest.raises(ConfigError, match="python/object/apply:os.system"):  # a named error, nothing run
        ModelConfig.from_yaml("!!python/object/apply:os.system ['echo pwned']")


heads = st.sampled_from([1, 2, 4, 8])


@st.composite
def gpt_configs(draw):
    h = draw(heads)
    groups = draw(st.sampled_from([d for d in (1, 2, 4, 8) if h % d == 0] + [None]))
    transformer = draw(st.fixed_dictionaries({}, optional={
        "layernorm_epsilon": st.floats(1e-8, 1e-3, allow_nan=False),
        "normalization": st.sampled_from(["LayerNorm", "RMSNorm"]),
        "add_bias_linear": st.booleans(),
        "gated_linear_unit": st.booleans(),
        "init_method_std": st.floats(0.001, 0.1),
    }))
    return GPTConfig(
        num_layers=draw(st.integers(1, 64)),
        hidden_size=h * draw(st.integers(1, 64)),
        num_attention_heads=h,
        num_query_groups=groups,
        ffn_hidden_size=draw(st.none() | st.integers(1, 4096)),
        dtype=draw(st.sampled_from(["fp32", "bf16", "fp16"])),
        impl=draw(st.sampled_from(["auto", "te", "local"])),
        hidden_dropout=draw(st.floats(0, 1)),
        vocab_size=draw(st.integers(1, 300_000)),
        seq_length=draw(st.integers(1, 1 << 17)),
        position_embedding_type=draw(st.sampled_from(["learned_absolute", "rope", "none"])),
        share_embeddings_and_output_weights=draw(st.booleans()),
        pre_wrap_hooks=draw(st.lists(st.just("test.identity"), max_size=2)),
        transformer=transformer,
    )


@settings(max_examples=150, deadline=None)
@given(gpt_configs())
def test_round_trip_is_lossless(config):
    assert ModelConfig.from_dict(config.as_dict()) == config
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_yaml(config.to_yaml()) == config
    assert json.loads(config.to_json()) == config.as_dict()


def test_a_tower_that_drops_its_first_token_is_not_a_mimo_encoder():
    vision = dict(builder="vision", image_size=16, patch_size=8, num_layers=2, hidden_size=32, num_attention_heads=4)
    assert ModelConfig.from_dict(vision).make_builder().mimo_problems("encoder") == []
    problems = ModelConfig.from_dict({**vision, "feature_select": "default"}).make_builder().mimo_problems("encoder")
    assert problems == ["feature_select 'default' cannot be exported to MIMO: MIMO takes the tower's every output "
                        "token, and the node drops its first; use feature_select 'full'"]
