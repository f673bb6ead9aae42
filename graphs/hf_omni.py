"""Nemotron-Omni (``NemotronH_Omni_Reasoning_V3``, model_type ``nemotron_h_omni``) as a graph:
a RADIO tower and its projector, a Parakeet audio encoder and its projector, and a Nemotron-H
language model, read by ``mimo-builder import-hf`` and written by ``export --as nemotron_h_omni``.

The graph: ``vision.embeddings -> proj.input``, ``proj.output -> lm.image``, and (when the
folder has an audio tower) ``audio.embeddings -> audio_proj.input``, ``audio_proj.output ->
lm.audio``. The tower pixel-shuffles its patches (``pixel_shuffle`` = 1 / downsample_ratio),
so the projector reads them as Nemotron-Omni's does. Every node reads the folder. A video under
the images' key runs as tubelets through the tower's video projection (``video_patch_frames``).
"""

from __future__ import annotations

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.hf.mapping import Nesting
from mimo_builder._internal.hf.whole import WholeModelFormat, tokenizer_entry
from submodels.hf_configs import node_config
from submodels.hf_nemotron_h import OMNI

MODEL_TYPE = "nemotron_h_omni"
ARCHITECTURE = "NemotronH_Omni_Reasoning_V3"
PROJECTORS = {"image": "nemotron_omni_vision", "audio": "nemotron_omni_audio"}
"""The language model's port -> the hf_format of the projector feeding it."""
TOWER_ROOTS = {"image": Nesting((("vision_final_layernorm.", "vision_projector.vision_final_layernorm."),
                                 ("", "vision_model."))),
               "audio": Nesting((("", "sound_encoder.encoder."),))}
PROJECTOR_ROOTS = {"image": "mlp1.", "audio": "sound_projection."}


def graph_from_omni(folder: str, hf: dict) -> dict:
    """The graph document of the Nemotron-Omni folder ``folder`` (its config.json is ``hf``)."""
    _no_pruning(hf)
    text = hf.get("text_config", {})
    lm = node_config(text, "config.json text_config", ("nemotron_h",))
    shuffle = _shuffle(hf)
    vision = node_config(hf.get("vision_config", {}), "config.json vision_config", ("radio",))
    vision.update(pixel_shuffle=shuffle, ln_post=text.get("num_nextn_predict_layers", 0) > 0)
    if hf.get("force_image_size"):
        vision["image_size"] = hf["force_image_size"]
    proj = _projector(vision["hidden_size"] * shuffle ** 2, hf.get("projector_hidden_size", 4096), lm, "image", False)
    nodes = {"vision": vision, "proj": proj}
    edges = ["vision.embeddings -> proj.input", "proj.output -> lm.image"]
    inputs = {"pixel_values": "vision.pixel_values"}
    lm["modality_token_ids"] = {"image": _token_id(hf, "image_token_id")}
    audio = hf.get("audio_config")
    if audio:
        # as transformers fills an Omni audio_config: no attention bias, no input scaling unless named
        section = {"attention_bias": False, "scale_input": False, **audio, "model_type": "parakeet_encoder"}
        nodes["audio"] = node_config(section, "config.json audio_config", ("parakeet_encoder",))
        nodes["audio"]["max_frames"] = _max_frames(nodes["audio"]["subsampling_factor"], lm["seq_length"])
        nodes["audio_proj"] = _projector(audio.get("hidden_size", 1024), audio.get("projection_hidden_size"), lm,
                                         "audio", audio.get("projection_bias", False))
        edges += ["audio.embeddings -> audio_proj.input", "audio_proj.output -> lm.audio"]
        inputs["audio_features"] = "audio.features"
        lm["modality_token_ids"]["audio"] = _token_id(hf, "audio_token_id")
    nodes["lm"] = lm
    doc = {"nodes": {name: {"builder": cfg.pop("builder"), "config": cfg, "init": {"hf": folder}}
                     for name, cfg in nodes.items()},
           "edges": edges,
           "inputs": {**inputs, "input_ids": "lm.input_ids", "labels": "lm.labels", "loss_mask": "lm.loss_mask"},
           "outputs": ["lm.loss"]}
    return {**doc, **tokenizer_entry(folder)}


def _no_pruning(hf: dict) -> None:
    rate = hf.get("video_pruning_rate", 0.0)
    if rate:
        raise ConfigError(f"config.json video_pruning_rate={rate!r} is not supported (efficient video sampling "
                          "drops tokens by content); supported: 0.0")


def _shuffle(hf: dict) -> int:
    ratio = hf.get("downsample_ratio", 0.5)
    side = round(1 / ratio) if ratio else 0
    if side < 1 or abs(side * ratio - 1) > 1e-6:
        raise ConfigError(f"config.json downsample_ratio={ratio!r}: supported are 1 / n for a whole n (0.5: 2 x 2 "
                          "patches per token)")
    return side


def _max_frames(factor: int, seq_length: int) -> int:
    """The longest clip the graph plans for (synthetic batches, validation): 30 s of 10 ms frames,
    or fewer, so that its tokens take at most a quarter of the language model's sequence. Parakeet
    itself has no limit (its positions are computed); raise it in the document as needed."""
    return max(factor, min(3000, factor * (seq_length // 4)))


def _token_id(hf: dict, field: str) -> int:
    value = hf.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config.json {field}={value!r}: the placeholder token's id is needed")
    return value


def _projector(width: int, hidden, lm: dict, port: str, bias: bool) -> dict:
    if not isinstance(hidden, int):
        raise ConfigError(f"config.json: the {port} projector's hidden size is {hidden!r}; give a number")
    return {"builder": "projector", "input_size": width, "output_size": lm["hidden_size"], "ffn_hidden_size": hidden,
            "activation": "relu2", "norm": "rmsnorm", "hf_format": PROJECTORS[port],
            "transformer": {"add_bias_linear": bool(bias)}}


# --- export --as nemotron_h_omni -------------------------------------------------------------------

def omni_nestings(graph) -> dict[str, Nesting]:
    """Where each node's tensors go in a Nemotron-Omni folder; a ConfigError naming the node when
    the graph is not Omni-shaped."""
    found = _omni_nodes(graph)
    out = {found["lm"]: OMNI}
    for port in ("image", "audio"):
        if port in found:
            tower, proj = found[port]
            out[tower], out[proj] = TOWER_ROOTS[port], Nesting.of(PROJECTOR_ROOTS[port])
    return out


def _omni_nodes(graph) -> dict:
    """{"lm": name, "image": (tower, projector), "audio": (tower, projector)} of an Omni-shaped
    graph; a ConfigError naming every node that does not fit."""
    into = {}
    for edge in graph.edges:
        source, target = (end.strip() for end in edge.split("->"))
        into[target] = source.split(".")[0]
    lms = [n for n, node in graph.nodes.items() if node.builder == "mamba"]
    if len(lms) != 1:
        raise ConfigError(f"export --as {MODEL_TYPE}: the model has one Nemotron-H language model (builder "
                          f"mamba); the graph has {len(lms)}")
    found, lm, problems = {"lm": lms[0]}, lms[0], []
    for port, tower_builder in (("image", "vision"), ("audio", "conformer")):
        proj = into.get(f"{lm}.{port}")
        if proj is None:
            problems += [f"node '{lm}' port 'image' is fed by no projector"] if port == "image" else []
            continue
        tower = into.get(f"{proj}.input")
        problems += _pair_problems(graph, port, tower, proj, tower_builder)
        found[port] = (tower, proj)
    used = {lm, *(n for pair in (found.get("image", ()), found.get("audio", ())) for n in pair)}
    problems += [f"node '{n}' (builder {graph.nodes[n].builder}) has no place in a Nemotron-Omni model"
                 for n in sorted(set(graph.nodes) - used)]
    if problems:
        raise ConfigError(f"export --as {MODEL_TYPE}: " + "; ".join(problems))
    return found


def _pair_problems(graph, port: str, tower, proj: str, tower_builder: str) -> list[str]:
    """Why the tower -> projector feeding the language model's ``port`` is not Nemotron-Omni's."""
    problems = []
    if graph.nodes[proj].builder != "projector" or graph.nodes[proj].config.get("hf_format") != PROJECTORS[port]:
        problems.append(f"node '{proj}' feeds port '{port}' but is not a projector with hf_format: {PROJECTORS[port]}")
    if tower is None or graph.nodes[tower].builder != tower_builder:
        what = "nothing" if tower is None else f"node '{tower}' (builder {graph.nodes[tower].builder})"
        return problems + [f"node '{proj}' is fed by {what}, not a {tower_builder} node"]
    config = graph.nodes[tower].config
    if port == "image" and (config.get("layout") != "radio" or not config.get("video_patch_frames")):
        problems.append(f"node '{tower}' must be a RADIO tower (layout: radio) with its video projection "
                        "(video_patch_frames: 2, as Nemotron-Omni's)")
    if port == "image" and config.get("ln_post"):
        problems.append(f"node '{tower}' has ln_post, which Nemotron-Omni holds only beside multi-token "
                        "prediction layers (not exported); set ln_post: false")
    return problems


def _config(graph, name: str):
    from mimo_builder._internal.kinds.config import ModelConfig

    node = graph.nodes[name]
    return ModelConfig.from_dict({"builder": node.builder, **node.config})


def omni_config(graph, configs: dict[str, dict]) -> dict:
    """Nemotron-Omni's config.json from the nodes' exported configs."""
    found = _omni_nodes(graph)
    tower, proj = found["image"]
    vision, projector, lm = _config(graph, tower), _config(graph, proj), _config(graph, found["lm"])
    ids = lm.modality_token_ids
    config = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "text_config": configs[found["lm"]],
              "vision_config": configs[tower], "downsample_ratio": 1 / vision.pixel_shuffle,
              "projector_hidden_size": projector.ffn_width, "vision_hidden_size": vision.hidden_size,
              "video_temporal_patch_size": vision.video_patch_frames, "force_image_size": vision.image_size,
              "image_token_id": _id(ids, "image", found["lm"]), "audio_config": None,
              "tie_word_embeddings": False}
    if "audio" in found:
        audio, audio_proj = found["audio"]
        sound = _config(graph, audio_proj)
        config["audio_config"] = {**configs[audio], "projection_hidden_size": sound.ffn_width,
                                  "projection_bias": bool(sound.transformer.get("add_bias_linear", True))}
        config["audio_token_id"] = _id(ids, "audio", found["lm"])
    return config


def _id(ids: dict, port: str, lm: str) -> int:
    value = ids.get(port)
    if not isinstance(value, int):
        raise ConfigError(f"export --as {MODEL_TYPE}: node '{lm}' modality_token_ids.{port}={value!r}: give the id")
    return value


NEMOTRON_H_OMNI = WholeModelFormat(name=MODEL_TYPE, model_types=(MODEL_TYPE,), graph_from=graph_from_omni,
                                   nestings=omni_nestings, config=omni_config)
"""The Nemotron-Omni whole-model format (entry point ``nemotron_h_omni`` of ``mimo_builder.hf_formats``)."""
