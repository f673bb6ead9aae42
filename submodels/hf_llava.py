"""LLaVA's multi-modal projector (``linear_1``, activation, ``linear_2``) <-> the projector node, and
where a language model's tensors sit in a LLaVA folder.

The projector alone has no transformers class: an export of the node writes LLaVA's tensor
names and projector fields, a part that ``export --as llava`` puts into the whole model.
"""

from __future__ import annotations

from mimo_builder._internal.hf import Expect, HFMapping, HFWeightsError, rename
from mimo_builder._internal.hf.mapping import Nesting

PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
"""As transformers saves a LLaVA model, and as its modules name it in memory."""

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}  # the projector kind's name -> HF's


def language_model_nestings(root: str) -> tuple[Nesting, ...]:
    """Where a causal LM whose base model is ``root`` (``backbone.``, ``model.``) sits in a LLaVA
    folder: as transformers saves it (``language_model.model.`` and ``language_model.lm_head.``,
    the layout of every LLaVA checkpoint), and as its modules name it in memory
    (``model.language_model.``, ``lm_head.``)."""
    return (Nesting(((root, "language_model.model."), ("lm_head.", "language_model.lm_head."))),
            Nesting(((root, "model.language_model."), ("lm_head.", "lm_head."))))


def llava_projector_mapping(cfg) -> HFMapping:
    """The mapping of a :class:`~submodels.projector.ProjectorConfig` to LLaVA's projector."""
    if cfg.projector_type != "mlp" or cfg.token_reduction != 1:
        raise HFWeightsError("LLaVA's projector is a two-layer MLP without token merging; the node has "
                             f"projector_type={cfg.projector_type!r}, token_reduction={cfg.token_reduction}")
    if cfg.ffn_width != cfg.output_size:
        raise HFWeightsError(f"LLaVA's projector is output_size wide inside; the node has ffn_hidden_size="
                             f"{cfg.ffn_width}, output_size={cfg.output_size}")
    bias = bool(cfg.transformer.get("add_bias_linear", True))
    rules = [rename(f"encoder.linear_fc{i}.{kind}", f"linear_{i}.{kind}")
             for i in (1, 2) for kind in (("weight", "bias") if bias else ("weight",))]
    return HFMapping(
        rules=tuple(rules),
        expect={"projector_hidden_act": Expect(ACTIVATIONS[cfg.activation], "activation", "gelu"),
                "multimodal_projector_bias": Expect(bias, "transformer.add_bias_linear", True)},
        export_config={"model_type": "llava_projector"},
        prefixes=PREFIXES,
        extra_checks=lambda hf: _width_problems(cfg, hf),
    )


def _width_problems(cfg, hf: dict) -> list[str]:
    """The LLaVA config's tower and language model widths against the node's."""
    problems = []
    layer = hf.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        problems.append(f"config.json vision_feature_layer={layer}: several feature layers (concatenated) "
                        "are not supported; give one layer")
    for section, field, have in (("vision_config", "input_size", cfg.input_size),
                                 ("text_config", "output_size", cfg.output_size)):
        width = hf.get(section, {}).get("hidden_size")
        if section in hf and width != have:
            problems.append(f"config.json {section}.hidden_size={width!r} but the node has {field}={have}")
    return problems
