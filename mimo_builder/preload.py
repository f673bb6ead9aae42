"""Imported once by the launcher's fork server, so that spawned ranks start with the stack
already imported (torch, Megatron-Core, the runtime) instead of importing it again each.
Importing it has no other effect; a module missing here is imported by the rank as usual."""

from mimo_builder.environment import quiet_dependency_warnings

quiet_dependency_warnings()  # the server's imports print nothing either

import torch.distributed  # noqa: E402,F401
import megatron.core.distributed  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401

import mimo_builder.checkpoint  # noqa: E402,F401
import mimo_builder.runtime.train  # noqa: E402,F401
