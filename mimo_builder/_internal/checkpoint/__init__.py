"""Checkpoints of a graph's training state on Megatron-Core's dist_checkpointing.

:class:`Checkpointer` saves and resumes (any placement), :func:`load_initial_weights` starts
nodes from the weights their document names, :func:`describe` summarises a checkpoint folder.
"""

from mimo_builder._internal.checkpoint.checkpointer import Checkpointer, Resumed
from mimo_builder._internal.checkpoint.files import CheckpointError, DataPosition
from mimo_builder._internal.checkpoint.pretrained import load_initial_weights
from mimo_builder._internal.checkpoint.safe_load import UnsafeCheckpointError

__all__ = ["Checkpointer", "CheckpointError", "DataPosition", "Resumed", "UnsafeCheckpointError",
           "load_initial_weights"]
