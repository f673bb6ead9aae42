"""Imported once by the launcher's fork server (machines without CUDA), so that spawned ranks
start with most of the stack already imported instead of importing it again each.

Only modules that leave CUDA untouched belong here: importing Megatron-Core queries the device,
after which torch refuses CUDA in every forked child ("Cannot re-initialize CUDA in forked
subprocess"); ranks import MCore themselves (about 1.5 s). On a GPU machine torch's compiler
stack queries the device too, so ranks there are spawned (``launch._rank_context``).
``tests/test_launch.py`` checks that ranks can still use CUDA.
"""

from mimo_builder._internal.platform.environment import quiet_dependency_warnings

quiet_dependency_warnings()  # the server's imports print nothing either

import networkx  # noqa: E402,F401
import pydantic  # noqa: E402,F401
import torch._inductor.compile_fx  # noqa: E402,F401
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.tensor  # noqa: E402,F401
import yaml  # noqa: E402,F401
