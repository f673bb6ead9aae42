"""The public surface for writing a node kind: a config, a builder, its ports (docs/extending.md).

``from mimo_builder.kinds import ModelConfig, ModelBuilder, Port, Ports`` is all a kind of plain
torch layers needs; the rest serves kinds that build MCore transformer layers, report costs to
the planner, or map their weights to a Hugging Face model. Names load on first use. The shipped
kinds' configs are in :mod:`submodels` (``from submodels import MambaConfig``).
"""

from mimo_builder._internal.lazy import LazyNames

_I = "mimo_builder._internal."
_PUBLIC = LazyNames(__name__, {
    # config and builder
    "ModelConfig": _I + "kinds.config", "PositiveInt": _I + "document.types", "NonNegativeInt": _I + "document.types",
    "StrictBool": _I + "document.types",
    "TransformerModelConfig": _I + "kinds.transformer_fields",
    "ModelBuilder": _I + "kinds.builder", "Port": _I + "kinds.builder", "Ports": _I + "kinds.builder",
    "token_input_ports": _I + "kinds.builder",
    # registration and references
    "register_builder": _I + "kinds.registry", "register_hook": _I + "kinds.registry",
    "allow_modules": _I + "kinds.registry", "registered_names": _I + "kinds.registry",
    # MCore transformer layers and the planner's costs
    "make_transformer_config": _I + "kinds.transformer", "parallel_transformer_config": _I + "kinds.transformer",
    "padded_vocab_size": _I + "kinds.transformer", "TRANSFORMER_LINEARS": _I + "kinds.transformer",
    "costs": _I + "kinds.costs:*",
    # inside run(): the module a builder built, out of its DDP / Float16Module wrappers
    "unwrap": _I + "assembly.tp_shard",
    # ragged inputs: per sample a list of items (ModelBuilder.ragged_inputs, item_tokens,
    # features_from_waveform for .wav clips)
    "Items": _I + "runtime.items", "run_items": _I + "runtime.items",
    # Hugging Face weights
    "HFMapping": _I + "hf.mapping", "Expect": _I + "hf.mapping", "Rule": _I + "hf.mapping",
    "rename": _I + "hf.mapping", "reshaped": _I + "hf.mapping", "padded_rows": _I + "hf.mapping",
    "fused_qkv": _I + "hf.mapping",
})

__all__ = sorted(_PUBLIC.names)


def __getattr__(name: str):
    return _PUBLIC.get(name)


def __dir__() -> list[str]:
    return _PUBLIC.dir(globals())
