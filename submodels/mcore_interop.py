"""MCore's ``HybridModelConfig`` (``megatron.training.models.hybrid``) as a project MambaConfig.

Takes the config object or its ``as_dict()`` form (as Megatron-Bridge serializes it) and maps
every field: named MambaConfig fields, parallel sizes (returned apart: they are placement, not
config), and any other TransformerConfig option that differs from what the named fields imply,
passed through in ``MambaConfig.transformer``. A field the project cannot express is a
ConfigError naming every such field; nothing is dropped silently. Unlike MCore's own
``from_dict``, the dict form is read without importing its ``_target_`` and unknown keys are
refused.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from mimo_builder._internal.errors import ConfigError, excerpt
from submodels.mamba import ACTIVATIONS, MambaConfig
from submodels.mamba_spec import hybrid_stack_spec, local_hybrid_stack_spec

HYBRID_TARGET = "megatron.training.models.hybrid.HybridModelConfig"
TRANSFORMER_TARGET = "megatron.core.transformer.transformer_config.TransformerConfig"

# HybridModelConfig field -> MambaConfig field, same meaning and value.
HYBRID_FIELDS = {name: name for name in (
    "hybrid_layer_pattern", "vocab_size", "make_vocab_size_divisible_by", "seq_length",
    "position_embedding_type", "share_embeddings_and_output_weights", "pre_wrap_hooks", "post_wrap_hooks")}
HYBRID_FIELDS["should_pad_vocab"] = "pad_vocab"
# HybridModelConfig fields the project builds exactly as MCore does at these values only.
HYBRID_DEFAULTS = {
    "fp16_lm_cross_entropy": False, "parallel_output": True, "hybrid_attention_ratio": 0.0,
    "hybrid_mlp_ratio": 0.0, "hybrid_override_pattern": None, "rotary_percent": 1.0, "rotary_base": 10000,
    "seq_len_interpolation_factor": None, "restore_modelopt_state": False, "extra_checkpoint_metadata": None,
}
# TransformerConfig field -> MambaConfig field.
TRANSFORMER_FIELDS = {name: name for name in (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "hidden_dropout", "attention_dropout", "normalization", "mamba_state_dim", "mamba_head_dim",
    "mamba_num_groups", "mamba_num_heads", "moe_router_topk", "moe_ffn_hidden_size")}
TRANSFORMER_FIELDS["num_moe_experts"] = "num_experts"
# TransformerConfig field -> placement field (parallel sizes come from the node's groups).
PLACEMENT_FIELDS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                    "context_parallel_size": "cp", "expert_model_parallel_size": "ep",
                    "expert_tensor_parallel_size": "etp"}
# Chosen by the project for the device it runs on; parameters do not depend on them.
DEVICE_FIELDS = {"use_cpu_initialization", "use_mamba_mem_eff_path", "pipeline_dtype"}
DTYPE_FIELDS = {"bf16", "fp16", "params_dtype"}
DTYPES = {(False, False, torch.float32): "fp32", (True, False, torch.bfloat16): "bf16",
          (False, True, torch.float16): "fp16"}
PLAIN = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ImportedHybrid:
    """A HybridModelConfig in project terms: the node config and its parallel sizes."""

    config: MambaConfig
    placement: dict[str, int]


def import_hybrid_config(source: Any, *, impl: str | None = None) -> ImportedHybrid:
    """Map an MCore ``HybridModelConfig`` (or its ``as_dict()``) onto a MambaConfig.

    ``impl`` overrides the layer implementation read from ``hybrid_stack_spec`` (None: MCore's
    default spec is 'auto', the project's local spec 'local'; a serialized spec needs ``impl``).
    """
    hybrid, transformer = _fields(source)
    unsupported = [f"{k}={excerpt(v)} (the project builds it as {HYBRID_DEFAULTS[k]!r})"
                   for k, v in hybrid.items() if k in HYBRID_DEFAULTS and v != HYBRID_DEFAULTS[k]]
    values = {HYBRID_FIELDS[k]: v for k, v in hybrid.items() if k in HYBRID_FIELDS and v is not None}
    values["impl"] = impl or _impl(hybrid.get("hybrid_stack_spec"), transformer.get("num_moe_experts"), unsupported)
    values.update({TRANSFORMER_FIELDS[k]: v for k, v in transformer.items() if k in TRANSFORMER_FIELDS})
    values.update(_named_transformer_values(transformer, unsupported))
    passthrough = _passthrough(transformer, unsupported)
    if unsupported:
        raise ConfigError("HybridModelConfig fields the project cannot express: " + "; ".join(unsupported))
    placement = {PLACEMENT_FIELDS[k]: v for k, v in transformer.items() if k in PLACEMENT_FIELDS and v is not None}
    if placement.get("etp") == placement.get("tp", 1):
        placement.pop("etp", None)  # None: same as tp
    config = MambaConfig.validated({**values, "transformer": passthrough}, "HybridModelConfig")
    return ImportedHybrid(config, placement)


def _fields(source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HybridModelConfig fields, TransformerConfig fields) of the object or its dict form."""
    if isinstance(source, dict):
        return _dict_fields(source)
    from megatron.training.models.hybrid import HybridModelConfig

    if not isinstance(source, HybridModelConfig):
        raise ConfigError(f"expected MCore's HybridModelConfig or its as_dict(), got {type(source).__name__}")
    hybrid = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name != "transformer"}
    return hybrid, {f.name: getattr(source.transformer, f.name) for f in dataclasses.fields(TransformerConfig)}


def _dict_fields(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from megatron.training.models.hybrid import HybridModelConfig

    _check_target(data, HYBRID_TARGET, "HybridModelConfig")
    transformer = data.get("transformer")
    if not isinstance(transformer, dict):
        raise ConfigError("HybridModelConfig dict: 'transformer' must be the TransformerConfig's dict")
    _check_target(transformer, TRANSFORMER_TARGET, "HybridModelConfig.transformer")
    hybrid = {k: v for k, v in data.items() if k not in ("_target_", "_builder_", "transformer")}
    fields = {f.name: f for f in dataclasses.fields(HybridModelConfig)}
    _refuse_unknown(hybrid, fields, "HybridModelConfig")
    values = {k: v for k, v in transformer.items() if k != "_target_"}
    _refuse_unknown(values, {f.name for f in dataclasses.fields(TransformerConfig)}, "HybridModelConfig.transformer")
    return hybrid, values


def _check_target(data: dict, expected: str, where: str) -> None:
    if data.get("_target_", expected) != expected:
        raise ConfigError(f"{where}: _target_ is {excerpt(data['_target_'])}, expected {expected!r}")


def _refuse_unknown(values: dict, fields, where: str) -> None:
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown} (not fields of the installed megatron-core)")


def _impl(spec: Any, num_experts: int | None, unsupported: list[str]) -> str:
    if spec is None:
        return "auto"  # MCore's default spec is Transformer Engine's; the project's TE spec where importable
    if _same(spec, local_hybrid_stack_spec(num_experts)):
        return "local"
    if spec is hybrid_stack_spec(True):
        return "te"
    unsupported.append("hybrid_stack_spec (a custom or serialized spec; pass impl='local' or 'te' when it is "
                       "one of the project's)")
    return "auto"


def _named_transformer_values(transformer: dict[str, Any], unsupported: list[str]) -> dict[str, Any]:
    """dtype, mlp_activation, and the None defaults MCore fills in (query groups, FFN width)."""
    out = {}
    key = tuple(transformer.get(k, d) for k, d in (("bf16", False), ("fp16", False), ("params_dtype", torch.float32)))
    if key in DTYPES:
        out["dtype"] = DTYPES[key]
    else:
        unsupported.append(f"bf16/fp16/params_dtype={key} (the project builds fp32, bf16 or fp16 nodes with "
                           "parameters of that dtype)")
    activation = transformer.get("activation_func", torch.nn.functional.gelu)  # as_dict() drops callables
    names = [name for name, func in ACTIVATIONS.items() if func is activation]
    if names:
        out["mlp_activation"] = names[0]
    else:
        unsupported.append(f"activation_func={excerpt(activation)} (one of {sorted(ACTIVATIONS)})")
    if transformer.get("num_query_groups") == transformer.get("num_attention_heads"):
        out["num_query_groups"] = None
    if transformer.get("ffn_hidden_size") == 4 * transformer["hidden_size"]:
        out["ffn_hidden_size"] = None
    return out


def _passthrough(transformer: dict[str, Any], unsupported: list[str]) -> dict[str, Any]:
    """The TransformerConfig options that differ from what the mapped fields imply."""
    owned = set(TRANSFORMER_FIELDS) | set(PLACEMENT_FIELDS) | DEVICE_FIELDS | DTYPE_FIELDS | {"activation_func"}
    base = {k: v for k, v in transformer.items() if k in owned and k in _defaults_source()}
    extra: dict[str, Any] = {}
    for _ in range(3):  # options derived from passed-through ones (init methods from init_method_std)
        reference = _reference(base, extra)
        differing = {k: v for k, v in transformer.items() if k not in owned and not _same(v, getattr(reference, k))}
        plain = {k: v for k, v in differing.items() if _is_plain(v)}
        if not plain.keys() - extra.keys():
            break
        extra.update(plain)
    for k, v in differing.items():
        if not _is_plain(v):
            unsupported.append(f"transformer.{k}={excerpt(v)} (not expressible in a document)")
    for k in list(extra):  # drop what the others imply (embedding_init_method_std from init_method_std)
        rest = {name: value for name, value in extra.items() if name != k}
        if _same(extra[k], getattr(_reference(base, rest), k)):
            extra = rest
    return extra


@functools.cache
def _defaults_source() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(TransformerConfig) if f.init)


def _reference(base: dict[str, Any], extra: dict[str, Any]) -> TransformerConfig:
    try:
        return TransformerConfig(**base, **extra)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"HybridModelConfig.transformer: MCore rejects its options: {err}") from err


def _same(a: Any, b: Any) -> bool:
    """Equal values; partials, dataclasses (ModuleSpecs) and containers compared by content."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return _same(a.func, b.func) and _same(a.args, b.args) and _same(a.keywords, b.keywords)
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, PLAIN) for v in value)
    return isinstance(value, PLAIN)
