"""The TransformerConfig of MCore transformer-based nodes (their shared fields are
:mod:`mimo_builder._internal.kinds.transformer_fields`, re-exported here).

Parallel sizes are not config: they come from the process groups the node is built on, so
the same document builds at any TP/PP/CP/EP. The ``transformer`` dict passes any other
TransformerConfig option through, checked against its fields.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.transformer_fields import OWNED_OPTIONS, TransformerModelConfig  # noqa: F401 (public here too)
from mimo_builder._internal.platform.compat import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRANSFORMER_LINEARS = frozenset({"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"})
"""The linear layers of Megatron-Core's transformer layer (self-attention and MLP), by module name."""


def use_te(impl: str) -> bool:
    """Whether to build with Transformer Engine layers for ``impl``."""
    available = te_available()
    if impl == "te" and not available:
        raise ConfigError("impl='te' needs Transformer Engine: pip install -e '.[gpu]' on a CUDA machine")
    return impl == "te" or (impl == "auto" and available)


@functools.cache
def te_available() -> bool:
    """Transformer Engine imports and a GPU is present."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Vocab padded to a multiple of ``multiple * tp`` as Megatron does."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def make_transformer_config(
    cfg: TransformerModelConfig,
    pg_collection: ProcessGroupCollection,
    device: str | torch.device = "auto",
    **model_options: Any,
) -> TransformerConfig:
    """TransformerConfig for ``cfg`` on ``pg_collection``'s sizes; ``model_options`` are the
    model-specific fields a concrete builder adds."""
    on_cpu = resolve_device(device).type == "cpu"
    options = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16",
        params_dtype=DTYPES[cfg.dtype],
        pipeline_dtype=DTYPES[cfg.dtype],
        tensor_model_parallel_size=pg_collection.tp.size(),
        pipeline_model_parallel_size=pg_collection.pp.size(),
        context_parallel_size=pg_collection.cp.size(),
        expert_model_parallel_size=pg_collection.ep.size(),
        expert_tensor_parallel_size=pg_collection.expt_tp.size(),
        use_cpu_initialization=on_cpu,
    )
    options.update(model_options)
    options.update(cfg.transformer)
    if on_cpu:
        options["use_cpu_initialization"] = True  # MCore's default init allocates on the GPU
    try:
        return TransformerConfig(**options)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"{type(cfg).__name__}: MCore rejected the TransformerConfig: {err}") from err


def parallel_transformer_config(
    pg_collection: ProcessGroupCollection,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    device: str | torch.device = "auto",
    **options: Any,
) -> TransformerConfig:
    """The TransformerConfig of a node without transformer layers: only what MCore's DDP,
    mixed-precision and optimizer wrappers read (parallel sizes, dtype, CPU initialisation).
    MCore requires layer and head counts; one layer and one head per TP rank satisfy it."""
    tp = pg_collection.tp.size()
    values = dict(
        num_layers=pg_collection.pp.size(), hidden_size=tp, num_attention_heads=tp,
        bf16=dtype == "bf16", fp16=dtype == "fp16", params_dtype=DTYPES[dtype], pipeline_dtype=DTYPES[dtype],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pg_collection.pp.size(),
        context_parallel_size=pg_collection.cp.size(),
        use_cpu_initialization=resolve_device(device).type == "cpu",
    )
    try:
        return TransformerConfig(**{**values, **options})
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"MCore rejected the node's TransformerConfig: {err}") from err
