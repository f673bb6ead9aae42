"""Imported once by the launcher's fork server, so that ranks start with the stack already
imported instead of importing it again each (about 2.4 s per rank: Megatron-Core, the runtime,
the builders; torch's own modules besides).

The fork server is used only where the launcher's ``torch.cuda.is_available()`` said no
(``launch._rank_context``; with a GPU the ranks are spawned). Importing Megatron-Core asks that
question again (``dist_checkpointing.strategies.torch`` and torch's ``cpp_extension``), and the
asking itself (``cudaGetDeviceCount``) marks the process so that torch refuses CUDA in every forked
child: a rank's CUDA call would then say "use the 'spawn' start method" instead of naming the
missing device. So the stack is imported while ``is_available`` gives the launcher's answer
without asking the driver. ``tests/test_launch.py`` checks that ranks find the stack imported
and can still reach CUDA. A module that fails to import here is left to the rank, which reports
the failure where it belongs.
"""

import importlib

from mimo_builder._internal.platform.environment import quiet_dependency_warnings

quiet_dependency_warnings()  # the server's imports print nothing either

import networkx  # noqa: E402,F401
import pydantic  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.tensor  # noqa: E402,F401
import yaml  # noqa: E402,F401

from mimo_builder._internal.platform.patching import replaced  # noqa: E402

RANK_MODULES = (
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "mimo_builder._internal.runtime.train",
    "mimo_builder._internal.runtime.generation",
)
"""What a rank imports whatever it runs (training, generation, checkpoints)."""


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # the rank imports it again and reports the failure where it belongs
        pass


def _preload_stack() -> None:
    """Megatron-Core, the runtime and the installed builders under the default allowed prefixes."""
    from mimo_builder._internal.kinds.registry import BUILDER_GROUP, DEFAULT_ALLOWED_PREFIXES, _read_entry_points

    for name in RANK_MODULES:
        _import_quietly(name)
    points, _ = _read_entry_points(BUILDER_GROUP)
    for point in points.values():
        if point.module.split(".")[0] in DEFAULT_ALLOWED_PREFIXES:
            _import_quietly(point.module)


with replaced(torch.cuda, "is_available", lambda: False):  # the launcher's answer, without poisoning forks
    _preload_stack()
