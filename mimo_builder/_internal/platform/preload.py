"""Imported once by the launcher's fork server, so that ranks start with the stack already
imported instead of importing it again each (about 2 s per rank: Megatron-Core, the runtime, the
builders; 5-6 s more for torch's own modules).

The fork server is used only where torch finds no CUDA device (``launch._rank_context``; with a GPU
the ranks are spawned): importing Megatron-Core queries the device, after which torch would refuse
CUDA in forked children, and the compiler stack queries it too. So this module first checks that
no device is there, and imports only the CUDA-free part of the stack where one is.
``tests/test_launch.py`` checks both. A module that fails to import here is left to the rank,
which reports it as it would without the server.
"""

import importlib

from mimo_builder._internal.platform.environment import quiet_dependency_warnings

quiet_dependency_warnings()  # the server's imports print nothing either

import networkx  # noqa: E402,F401
import pydantic  # noqa: E402,F401
import torch  # noqa: E402
import torch._inductor.compile_fx  # noqa: E402,F401
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.tensor  # noqa: E402,F401
import yaml  # noqa: E402,F401

RANK_MODULES = (
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "mimo_builder._internal.runtime.train",
    "mimo_builder._internal.runtime.generation",
)
"""What a rank imports whatever it runs (the project's own: training, generation, checkpoints)."""


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # the rank imports it again and reports the failure where it belongs
        pass


def _preload_stack() -> None:
    """Megatron-Core, the runtime and the project's installed builders (entry points under the
    default allowed prefixes): only on a machine without CUDA."""
    from mimo_builder._internal.kinds.registry import BUILDER_GROUP, DEFAULT_ALLOWED_PREFIXES, _read_entry_points

    for name in RANK_MODULES:
        _import_quietly(name)
    points, _ = _read_entry_points(BUILDER_GROUP)
    for point in points.values():
        if point.module.split(".")[0] in DEFAULT_ALLOWED_PREFIXES:
            _import_quietly(point.module)


if not torch.cuda.is_available():
    _preload_stack()
