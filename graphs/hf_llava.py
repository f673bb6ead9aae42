"""LLaVA (``LlavaForConditionalGeneration``) as a graph: a vision tower, LLaVA's projector and a
language model, read by ``mimo-builder import-hf`` and written by ``export --as llava``.

The graph: ``vision.embeddings -> proj.input``, ``proj.output -> lm.image``; every node reads
the LLaVA folder (``init: {hf: DIR}``). Towers: CLIP, SigLIP. Language models: the kinds of
:mod:`submodels.hf_configs` (Mamba2, Nemotron-H). No placement is written: every node spans
every rank until the user places it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.hf.mapping import Nesting
from mimo_builder._internal.hf.whole import WholeModelFormat, tokenizer_entry
from submodels.hf_configs import node_config
from submodels.hf_llava import language_model_nestings

TOWERS = ("clip_vision_model", "siglip_vision_model")
LANGUAGE_MODELS = ("mamba2", "nemotron_h")
BASE_MODEL = {"mamba": "backbone."}
"""A language model kind -> its base model's tensor root in the causal-LM folder it exports."""
NODES = ("vision", "proj", "lm")


def graph_from_llava(folder: str, hf: dict) -> dict:
    """The graph document of the LLaVA folder ``folder`` (its config.json is ``hf``)."""
    vision = node_config(hf.get("vision_config", {}), "config.json vision_config", TOWERS)
    lm = node_config(hf.get("text_config", {}), "config.json text_config", LANGUAGE_MODELS)
    vision.update(feature_layer=_feature_layer(hf, vision["num_layers"]),
                  feature_select=_strategy(hf), **_normalisation(folder))
    lm["modality_token_ids"] = {"image": hf.get("image_token_index", hf.get("image_token_id", 32000))}
    proj = {"builder": "projector", "input_size": vision["hidden_size"], "output_size": lm["hidden_size"],
            "ffn_hidden_size": lm["hidden_size"], "activation": hf.get("projector_hidden_act", "gelu"),
            "transformer": {"add_bias_linear": hf.get("multimodal_projector_bias", True)}}
    doc = {"nodes": {name: {"builder": cfg.pop("builder"), "config": cfg, "init": {"hf": folder}}
                     for name, cfg in zip(NODES, (vision, proj, lm))},
           "edges": ["vision.embeddings -> proj.input", "proj.output -> lm.image"],
           "inputs": {"pixel_values": "vision.pixel_values", "input_ids": "lm.input_ids",
                      "labels": "lm.labels", "loss_mask": "lm.loss_mask"},
           "outputs": ["lm.loss"]}
    return {**doc, **tokenizer_entry(folder)}


def _feature_layer(hf: dict, layers: int) -> int:
    """LLaVA's ``vision_feature_layer`` (an index into hidden_states: 0 the embeddings) counted
    from the end, as the vision node's ``feature_layer``."""
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConfigError(f"config.json vision_feature_layer={layer!r}: only one feature layer is supported "
                          "(several, concatenated, are not)")
    if not -layers <= (layer if layer < 0 else layer - layers - 1) <= -1:
        raise ConfigError(f"config.json vision_feature_layer={layer}: the tower's output is a layer's, from "
                          f"1 to {layers} (or -{layers} to -1); 0 (the embeddings) is not supported")
    return layer if layer < 0 else layer - layers - 1


def _strategy(hf: dict) -> str:
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"config.json vision_feature_select_strategy={strategy!r}; supported: 'default', 'full'")
    return strategy


def _normalisation(folder: str) -> dict:
    """image_mean / image_std of the folder's preprocessor_config.json, when it has them."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {key: tuple(data[key]) for key in ("image_mean", "image_std") if isinstance(data.get(key), list)}


# --- export --as llava ---------------------------------------------------------------------------

def llava_nestings(graph) -> dict[str, Nesting]:
    """Where each node's tensors go in a LLaVA folder; a ConfigError naming the node when the
    graph is not LLaVA-shaped (one tower -> one projector -> the language model's ``image`` port)."""
    tower, proj, lm = _llava_nodes(graph)
    root = BASE_MODEL[graph.nodes[lm].builder]
    return {tower: Nesting((("", "vision_tower."),)), proj: Nesting((("", "multi_modal_projector."),)),
            lm: language_model_nestings(root)[0]}  # as transformers saves a LLaVA model


def _llava_nodes(graph) -> tuple[str, str, str]:
    edges = {}
    for edge in graph.edges:
        source, target = (end.strip() for end in edge.split("->"))
        edges[(source.split(".")[0], target.split(".")[0])] = target.split(".")[1]
    towers = [n for n, node in graph.nodes.items() if node.builder == "vision"]
    projs = [n for n, node in graph.nodes.items() if node.builder == "projector"]
    lms = [n for n, node in graph.nodes.items() if node.builder in BASE_MODEL]
    others = sorted(set(graph.nodes) - set(towers) - set(projs) - set(lms))
    if others:
        raise ConfigError("export --as llava: " + "; ".join(
            f"node '{n}' (builder {graph.nodes[n].builder}) has no place in a LLaVA model, which holds one "
            "vision tower, its projector and a Mamba language model" for n in others))
    if (len(towers), len(projs), len(lms)) != (1, 1, 1):
        raise ConfigError(f"export --as llava: a LLaVA model has one vision node, one projector and one "
                          f"language model; the graph has {len(towers)}, {len(projs)} and {len(lms)}")
    tower, proj, lm = towers[0], projs[0], lms[0]
    if (tower, proj) not in edges or edges.get((proj, lm)) != "image":
        raise ConfigError(f"export --as llava: LLaVA runs node '{tower}' -> node '{proj}' -> node '{lm}' "
                          "port 'image'; the graph's edges differ")
    return tower, proj, lm


def _config(graph, name: str):
    from mimo_builder._internal.kinds.config import ModelConfig

    node = graph.nodes[name]
    return ModelConfig.from_dict({"builder": node.builder, **node.config})


def llava_config(graph, configs: dict[str, dict]) -> dict:
    """LLaVA's config.json from the nodes' exported configs (the tower's layers end at its
    feature layer, so LLaVA reads the last one)."""
    tower, proj, lm = _llava_nodes(graph)
    vision, text = _config(graph, tower), configs[lm]
    image_id = _config(graph, lm).modality_token_ids.get("image")
    if not isinstance(image_id, int):
        raise ConfigError(f"export --as llava: node '{lm}' modality_token_ids.image={image_id!r}: give the id "
                          "(LLaVA's image_token_index is a number)")
    strategy = vision.feature_select
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": configs[tower], "text_config": text,
            "image_token_index": image_id, "image_seq_length": vision.num_tokens - (strategy == "default"),
            "vision_feature_layer": -1, "vision_feature_select_strategy": strategy,
            "projector_hidden_act": configs[proj]["projector_hidden_act"],
            "multimodal_projector_bias": configs[proj]["multimodal_projector_bias"],
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}


LLAVA = WholeModelFormat(name="llava", model_types=("llava",), graph_from=graph_from_llava,
                         nestings=llava_nestings, config=llava_config)
"""The LLaVA whole-model format (entry point ``llava`` of ``mimo_builder.hf_formats``)."""
