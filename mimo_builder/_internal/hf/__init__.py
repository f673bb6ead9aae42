"""Hugging Face weights for graph nodes: import (``init: {hf: DIR}`` or :func:`load_hf`) and
export (:func:`export_hf`, :func:`export_node`) in safetensors + config.json layout.

Generic: a builder says how its parameters correspond to a Hugging Face model by returning an
:class:`HFMapping` from ``hf_mapping()``; the per-model mappings live with the submodels.
"""

from mimo_builder._internal.hf.convert import check_folder, export_hf, load_hf
from mimo_builder._internal.hf.mapping import (
    Expect,
    HFConfigError,
    HFMapping,
    HFShapeError,
    HFWeightsError,
    MissingHFTensorsError,
    Rule,
    UnknownHFTensorsError,
    fused_qkv,
    padded_rows,
    rename,
    reshaped,
)
from mimo_builder._internal.hf.nodes import export_node, init_problems, load_hf_nodes

__all__ = ["Expect", "HFConfigError", "HFMapping", "HFShapeError", "HFWeightsError", "MissingHFTensorsError",
           "Rule", "UnknownHFTensorsError", "check_folder", "export_hf", "export_node", "fused_qkv",
           "init_problems", "load_hf", "load_hf_nodes", "padded_rows", "rename", "reshaped"]
