"""A graph rebuilt from a checkpoint for use, not training: what ``generate`` and ``export`` run."""

from __future__ import annotations

from mimo_builder._internal.assembly.walker import CompositeBuilder, CompositeModel
from mimo_builder._internal.checkpoint import Checkpointer
from mimo_builder._internal.checkpoint.files import read_manifest, resolve
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.platform.compat import init_runtime


def build_trained(graph: Graph, load: str) -> CompositeModel:
    """``graph`` built on this rank (no DDP, no mixed-precision wrapper) from the seed the
    checkpoint's run used (a LoRA node's base comes from it), with the checkpoint's weights
    loaded (no optimizer). Collective over every rank."""
    init_runtime("auto")
    seed = read_manifest(resolve(load)).seed
    builder = CompositeBuilder(graph) if seed is None else CompositeBuilder(graph, seed=seed)
    (model,) = builder.build_distributed_models(wrap_with_ddp=False, mixed_precision_wrapper=None)
    Checkpointer(model).load(load, with_optimizer=False)
    return model
