"""Nemotron-Omni's projectors <-> the projector node (``hf_format: nemotron_omni_vision`` or
``nemotron_omni_audio``): RMSNorm, linear, squared ReLU, linear.

Names are those of the files (transformers saves Nemotron-Omni under the original checkpoint's
names and renames them when it loads): the image projector is ``mlp1.0`` (norm), ``mlp1.1`` and
``mlp1.3`` (linears, no bias); the audio projector ``sound_projection.norm``, ``.linear1`` and
``.linear2`` (biases as ``audio_config.projection_bias``). The image projector's input is the
vision node's pixel-shuffled patches (its ``pixel_shuffle``), not merged here.
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, rename

NAMES = {"nemotron_omni_vision": ("mlp1.", "0", "1", "3"),
         "nemotron_omni_audio": ("sound_projection.", "norm", "linear1", "linear2")}
"""hf_format -> (prefix, norm, first linear, second linear)."""


def omni_projector_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.projector.ProjectorConfig` to one of Nemotron-Omni's projectors."""
    wrong = [f"{field}={have!r} (needs {want!r})" for field, have, want in (
        ("projector_type", cfg.projector_type, "mlp"), ("token_reduction", cfg.token_reduction, 1),
        ("norm", cfg.norm, "rmsnorm"), ("activation", cfg.activation, "relu2")) if have != want]
    if wrong:
        raise HFWeightsError(f"Nemotron-Omni's projectors are RMSNorm, linear, squared ReLU, linear; the node has "
                             + ", ".join(wrong))
    prefix, norm, first, second = NAMES[cfg.hf_format]
    bias = bool(cfg.transformer.get("add_bias_linear", True))
    audio = cfg.hf_format == "nemotron_omni_audio"
    if bias and not audio:
        raise HFWeightsError("Nemotron-Omni's image projector has no biases; set transformer.add_bias_linear: false")
    kinds = ("weight", "bias") if bias else ("weight",)
    rules = [rename("norm.weight", f"{norm}.weight")]
    rules += [rename(f"encoder.linear_fc{i}.{kind}", f"{name}.{kind}")
              for i, name in ((1, first), (2, second)) for kind in kinds]
    return HFMapping(
        rules=tuple(rules),
        expect=_audio_fields(cfg, bias) if audio else _image_fields(cfg),
        export_config={"model_type": "nemotron_h_omni_projector"},
        prefixes=(prefix,),
        config_section="audio_config" if audio else None,
        extra_checks=None if audio else (lambda hf: _image_problems(cfg, hf)),
    )


def _audio_fields(cfg, bias: bool) -> dict[str, Expect]:
    return {"hidden_size": Expect(cfg.input_size, "input_size", 1024),
            "projection_hidden_size": Expect(cfg.ffn_width, "ffn_hidden_size", None),
            "projection_bias": Expect(bias, "transformer.add_bias_linear", None)}


def _image_fields(cfg) -> dict[str, Expect]:
    return {"projector_hidden_size": Expect(cfg.ffn_width, "ffn_hidden_size", 4096)}


def _image_problems(cfg, hf: dict) -> list[str]:
    """The tower's pixel-shuffled width and the language model's width against the node's."""
    problems = []
    ratio = hf.get("downsample_ratio", 0.5)
    width = hf.get("vision_hidden_size", 1280) * round(1 / ratio) ** 2
    if width != cfg.input_size:
        problems.append(f"config.json vision_hidden_size x (1 / downsample_ratio)^2 = {width} but the node has "
                        f"input_size={cfg.input_size}")
    text = hf.get("text_config", {}).get("hidden_size")
    if "text_config" in hf and text != cfg.output_size:
        problems.append(f"config.json text_config.hidden_size={text!r} but the node has output_size={cfg.output_size}")
    return problems
