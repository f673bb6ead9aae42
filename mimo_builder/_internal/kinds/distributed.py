"""One node's distributed init: the single path every builder's chunks go through.

Steps, in order: build the virtual-pipeline chunks (on the meta device if the config asks),
pre-wrap hook, TP attribute defaults, device placement, mixed-precision wrapper, meta
materialization, DDP (or FSDP) wrapping on the node's own groups, DP-rank-0 broadcast.
The steps reuse ``megatron.training.models.dist_utils``; what differs is that the device comes
from :func:`mimo_builder._internal.platform.compat.resolve_device` instead of being assumed to be CUDA.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.training.models import dist_utils

from mimo_builder._internal.platform.compat import resolve_device
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.platform import private

Hook = Callable[[list[MegatronModule]], list[MegatronModule]]


def build_distributed_models(
    build_model_func: Callable[..., MegatronModule],
    transformer_config: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    ddp_config: DistributedDataParallelConfig | None = None,
    overlap_param_gather_with_optimizer_step: bool = False,
    use_megatron_fsdp: bool = False,
    use_torch_fsdp2: bool = False,
    wrap_with_ddp: bool = True,
    data_parallel_random_init: bool = False,
    mixed_precision_wrapper: Callable[[Any, MegatronModule], MegatronModule] | None = Float16Module,
    pre_wrap_hook: Hook | None = None,
    model_type: ModelType = ModelType.encoder_or_decoder,
    device: str | torch.device = "auto",
) -> list[MegatronModule]:
    """Build this rank's chunks with ``build_model_func`` and wrap them for training.

    Mirrors ``dist_utils.unimodal_build_distributed_models`` (same arguments, same order of
    steps) and works on CPU as well as CUDA. Returns one chunk per virtual pipeline stage.
    """
    device = resolve_device(device)
    _check_request(device, transformer_config, ddp_config, wrap_with_ddp, use_megatron_fsdp, use_torch_fsdp2)
    on_meta = transformer_config.init_model_with_meta_device
    chunks = build_chunks(build_model_func, transformer_config, pg_collection, model_type)
    if pre_wrap_hook is not None:
        chunks = _apply_hook(pre_wrap_hook, chunks)
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    for chunk in chunks:  # Float16Module reads the pipeline group from here, else from MCore's globals
        if getattr(chunk, "pg_collection", None) is None:
            chunk.pg_collection = pg_collection
    if device.type == "cuda" and not on_meta and not use_torch_fsdp2:
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    chunks = private.wrap_with_mixed_precision(chunks, transformer_config, mixed_precision_wrapper)
    if on_meta and not (use_torch_fsdp2 or use_megatron_fsdp):
        chunks = [materialize(chunk, device) for chunk in chunks]
    if wrap_with_ddp:
        # MCore sizes buckets by writing into the DDP config: give each node its own copy.
        return private.wrap_with_ddp(
            chunks,
            data_parallel_random_init,
            copy.copy(ddp_config),
            overlap_param_gather_with_optimizer_step,
            use_megatron_fsdp=use_megatron_fsdp,
            use_torch_fsdp2=use_torch_fsdp2,
            pg_collection=pg_collection,
        )
    if data_parallel_random_init:
        broadcast_from_data_parallel_rank0(chunks, pg_collection)
    return chunks


def build_chunks(
    build_model_func: Callable[..., MegatronModule],
    transformer_config: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    model_type: ModelType = ModelType.encoder_or_decoder,
    meta: bool | None = None,
) -> list[MegatronModule]:
    """One chunk per virtual pipeline stage with MCore's pre/post-process flags; on the meta
    device when ``meta`` (default: ``transformer_config.init_model_with_meta_device``)."""
    vp_size = transformer_config.virtual_pipeline_model_parallel_size
    if transformer_config.init_model_with_meta_device if meta is None else meta:
        with torch.device("meta"):
            chunks = dist_utils.build_virtual_pipeline_stages(build_model_func, pg_collection, vp_size, model_type)
    else:
        chunks = dist_utils.build_virtual_pipeline_stages(build_model_func, pg_collection, vp_size, model_type)
    return [as_megatron_module(chunk, transformer_config, pg_collection, build_model_func) for chunk in chunks]


class PlainModuleChunk(MegatronModule):
    """A plain ``torch.nn.Module`` as a model chunk. MCore's DDP and mixed-precision wrappers
    read the chunk's ``config`` and checkpoints its ``sharded_state_dict`` (here: every tensor
    replicated over TP, keys under ``module.``); the module itself is unchanged at ``.module``."""

    def __init__(self, config: TransformerConfig, module: torch.nn.Module, pg_collection: ProcessGroupCollection):
        super().__init__(config)
        self.module = module
        self.tp_group = pg_collection.tp  # read by sharded_state_dict (else MCore's global group)

    def forward(self, *args, **kwargs):
        """Call the wrapped module with the same arguments and return its output."""
        return self.module(*args, **kwargs)


def as_megatron_module(chunk: Any, config: TransformerConfig, pg_collection: ProcessGroupCollection,
                       built_by: Callable) -> MegatronModule:
    """``chunk`` itself when it is a MegatronModule, a plain module inside a
    :class:`PlainModuleChunk`; anything else is a named error."""
    if isinstance(chunk, MegatronModule):
        return chunk
    if isinstance(chunk, torch.nn.Module):
        return PlainModuleChunk(config, chunk, pg_collection)
    raise ConfigError(f"{getattr(built_by, '__qualname__', built_by)}() returned {type(chunk).__name__}, "
                      "not a torch.nn.Module")


def materialize(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give meta tensors real (uninitialised) storage on ``device``, as MCore does before
    loading a checkpoint; tensors already real are moved, not overwritten."""
    return dist_utils.to_empty_if_meta_device(module, device=device)


def broadcast_from_data_parallel_rank0(chunks: list[torch.nn.Module], pg_collection: ProcessGroupCollection) -> None:
    """Make DP replicas equal to DP rank 0 (expert parameters over the expert-DP group)."""
    for chunk in chunks:
        for param in chunk.parameters():
            expert = not getattr(param, "allreduce", True)
            group = pg_collection.expt_dp if expert else pg_collection.dp_cp
            dist.broadcast(param.data, src=dist.get_global_rank(group, 0), group=group)


def _apply_hook(hook: Hook, chunks: list[MegatronModule]) -> list[MegatronModule]:
    if not callable(hook):
        raise TypeError(f"pre_wrap_hook must be callable, got {type(hook).__name__}")
    result = hook(chunks)
    if result is None:
        raise ConfigError("a pre-wrap hook returned None; hooks must return the (possibly new) list of chunks")
    return result


def _check_request(device, transformer_config, ddp_config, wrap_with_ddp, use_megatron_fsdp, use_torch_fsdp2):
    if wrap_with_ddp and ddp_config is None:
        raise ConfigError("ddp_config is required when wrap_with_ddp=True "
                          "(pass DistributedDataParallelConfig(...) or wrap_with_ddp=False)")
    if use_megatron_fsdp and use_torch_fsdp2:
        raise ConfigError("use_megatron_fsdp and use_torch_fsdp2 are mutually exclusive; choose one")
    if device.type != "cuda" and (use_megatron_fsdp or use_torch_fsdp2):
        which = "use_megatron_fsdp" if use_megatron_fsdp else "use_torch_fsdp2"
        raise ConfigError(f"{which} needs CUDA devices (this build runs on {device.type}); "
                          "use MCore DDP (the default) on CPU")
    if device.type == "cpu" and not (transformer_config.use_cpu_initialization
                                     or transformer_config.init_model_with_meta_device):
        raise ConfigError("on CPU, TransformerConfig.use_cpu_initialization must be True "
                          "(MCore's default initialisation allocates on the GPU)")
