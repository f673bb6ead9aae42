"""The one call that builds a graph: :func:`build` (``from mimo_builder import build``)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder._internal.assembly.walker import CompositeBuilder, CompositeModel
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.loading import load_graph
from mimo_builder._internal.platform import compat


def build(graph: Graph | str, *, seed: int = 1234, ddp: DistributedDataParallelConfig | dict | None = None,
          device: str | torch.device = "auto", **builder_options: Any) -> CompositeModel:
    """Build and wrap this rank's nodes of ``graph`` and return the composite model.

    Call it on every rank (under :func:`mimo_builder.launch` or torchrun). ``graph`` is a
    :class:`Graph` or what :func:`load_graph` reads (a YAML/JSON path or ``module:attr``).
    ``ddp`` is the default DDP config under each node's own ``ddp`` options (a dict of
    ``DistributedDataParallelConfig`` fields is accepted). ``device``: ``"auto"`` (CUDA when
    present, else CPU with its workarounds), ``"cpu"`` or ``"cuda"``. Further keywords go to
    :class:`CompositeBuilder` (``step_timeout_s``, ``pre_wrap_hooks``, ...).
    """
    if isinstance(graph, str):
        graph = load_graph(graph)
    compat.init_runtime(device)
    (model,) = CompositeBuilder(graph, seed=seed, **builder_options).build_distributed_models(
        ddp_config=_ddp_config(ddp))
    return model


def _ddp_config(ddp: DistributedDataParallelConfig | dict | None) -> DistributedDataParallelConfig:
    if ddp is None:
        return DistributedDataParallelConfig()
    if isinstance(ddp, DistributedDataParallelConfig):
        return ddp
    try:
        return DistributedDataParallelConfig(**ddp)
    except TypeError as err:
        raise ConfigError(f"build(ddp=...): {err}; the fields are DistributedDataParallelConfig's") from err
