"""Every private name of torch and Megatron-Core the project uses, in one place, each with why.

An upgrade of either library that renames one of these breaks here and nowhere else. Code
elsewhere calls these functions; ``tests/test_imports.py`` keeps private names out of other
modules (the fenced ones: this, ``compat`` and ``patching``, ``preload``).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.training.models import dist_utils
from torch.distributed.checkpoint._traverse import set_element  # noqa: F401 (re-exported)

# set_element: the one helper that writes a loaded tensor into a nested state dict by its path,
# as torch's own planners do; the safe checkpoint reader (checkpoint/safe_load.py) reuses it.


def abort_group(group) -> None:
    """Abort ``group``: peers blocked in it fail at once. torch exposes abort only privately."""
    dist.distributed_c10d._abort_process_group(group)


def group_alive(group) -> bool:
    """Whether torch still knows ``group`` (not destroyed): no public query exists."""
    return group in dist.distributed_c10d._world.pg_map


def default_store() -> dist.Store:
    """The default group's rendezvous store (with its key prefix): no public accessor exists."""
    return dist.distributed_c10d._get_default_store()


def register_fake_backend() -> None:
    """Register torch's "fake" process-group backend (a world without processes, for planning
    on meta tensors); it lives in torch's testing internals."""
    from torch.testing._internal.distributed import fake_pg  # noqa: F401


def wrap_with_mixed_precision(chunks, transformer_config, wrapper):
    """MCore's mixed-precision wrapping of model chunks (``dist_utils._wrap_with_mp_wrapper``):
    the builder base uses it too, with no public name."""
    return dist_utils._wrap_with_mp_wrapper(chunks, transformer_config, wrapper)


def wrap_with_ddp(chunks, *args, **kwargs):
    """MCore's DDP / FSDP wrapping of model chunks (``dist_utils._ddp_wrap``), with no public name."""
    return dist_utils._ddp_wrap(chunks, *args, **kwargs)


def split_tensor_factory(sharded, sections: list[int], names: list[str], dim: int):
    """A checkpoint entry of a tensor that packs parts split over TP one by one, as MCore's
    Mamba mixer saves ``in_proj.weight`` (``ssm.utils._split_tensor_factory``); LoRA's B of that
    layer packs the same parts."""
    from megatron.core.ssm.utils import _split_tensor_factory

    return _split_tensor_factory(sharded, sections, names, dim)
