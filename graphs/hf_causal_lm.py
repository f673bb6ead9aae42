"""Hugging Face causal language models (``Mamba2ForCausalLM``, ``NemotronHForCausalLM``) as one-node
graphs: ``mimo-builder import-hf DIR`` writes the ``lm`` node that reads the folder, and
``export --as mamba2`` / ``--as nemotron_h`` writes a trained ``mamba`` node back as that model.
"""

from __future__ import annotations

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.hf.mapping import Nesting
from mimo_builder._internal.hf.whole import WholeModelFormat, tokenizer_entry
from submodels.hf_configs import node_config


def _graph_from(folder: str, hf: dict) -> dict:
    lm = node_config(hf, "config.json", ("mamba2", "nemotron_h"))
    return {"nodes": {"lm": {"builder": lm.pop("builder"), "config": lm, "init": {"hf": folder}}},
            "inputs": {"input_ids": "lm.input_ids", "labels": "lm.labels", "loss_mask": "lm.loss_mask"},
            "outputs": ["lm.loss"], **tokenizer_entry(folder)}


def _the_node(graph, model_type: str) -> str:
    """The graph's one ``mamba`` node, whose pattern this model type holds; ConfigError naming it."""
    from mimo_builder._internal.kinds.config import ModelConfig

    where = f"export --as {model_type}"
    if len(graph.nodes) != 1 or next(iter(graph.nodes.values())).builder != "mamba":
        kinds = {name: node.builder for name, node in graph.nodes.items()}
        raise ConfigError(f"{where}: the model is one 'mamba' node; the graph has {kinds}")
    (name, node), = graph.nodes.items()
    all_mamba = set(ModelConfig.from_dict({"builder": node.builder, **node.config}).layer_symbols) == {"M"}
    if all_mamba != (model_type == "mamba2"):
        fits = "mamba2" if all_mamba else "nemotron_h"
        raise ConfigError(f"{where}: node '{name}' hybrid_layer_pattern is written as {fits}, not {model_type}")
    return name


def causal_lm_format(model_type: str) -> WholeModelFormat:
    """The one-node format of ``model_type`` (the node's own export is the whole model)."""
    return WholeModelFormat(
        name=model_type, model_types=(model_type,), graph_from=_graph_from,
        nestings=lambda graph: {_the_node(graph, model_type): Nesting((("", ""),))},
        config=lambda graph, configs: configs[_the_node(graph, model_type)])


MAMBA2 = causal_lm_format("mamba2")
"""``Mamba2ForCausalLM`` (entry point ``mamba2`` of ``mimo_builder.hf_formats``)."""
NEMOTRON_H = causal_lm_format("nemotron_h")
"""``NemotronHForCausalLM`` (entry point ``nemotron_h`` of ``mimo_builder.hf_formats``)."""
