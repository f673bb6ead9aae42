"""Interoperation with Megatron-Core's own MIMO runtime.

:func:`to_mimo_model` exports a star-shaped graph (encoders -> projections -> one language node)
to MCore's ``MimoModel`` with the same weights; :func:`check_exportable` says, before any process
group exists, why a graph cannot be exported. Each node's builder supplies its part through
:meth:`mimo_builder._internal.kinds.builder.ModelBuilder.mimo_spec`. See docs/interop.md.
"""

from mimo_builder._internal.interop.export import (
    MIMO_LANGUAGE_KEY,
    mimo_forward_inputs,
    mimo_model_config,
    mimo_module_prefix,
    to_mimo_model,
)
from mimo_builder._internal.interop.star import Modality, Star, check_exportable, star_shape

__all__ = ["MIMO_LANGUAGE_KEY", "Modality", "Star", "check_exportable", "mimo_forward_inputs",
           "mimo_model_config", "mimo_module_prefix", "star_shape", "to_mimo_model"]
