"""Hugging Face RADIO towers <-> the vision node with ``layout: radio`` (MCore's RADIO ViT): a tiny
random ``RadioModel`` (from a config, fp32, no download) imported through ``init: {hf: DIR}``
gives transformers' patch features at TP=1 and TP=2 at the configured size and at others (the
cropped position embeddings); the export loads in transformers; the pixel shuffle is
Nemotron-Omni's. transformers is imported only inside spawned ranks."""


import pytest
import torch

from hf_folders import builder_of, edited_folder
from multirank import run_ranks

REL_TOL = 1e-5
HF = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, patch_size=4, image_size=16,
          max_img_size=32, num_cls_tokens=2, num_registers=1, video_temporal_patch_size=2,
          norm_mean=[0.5, 0.4, 0.3], norm_std=[0.2, 0.3, 0.25])
NODE = dict(builder="vision", layout="radio", image_size=16, max_image_size=32, patch_size=4, num_layers=2,
            hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, class_tokens=2, registers=1,
            activation="gelu", video_patch_frames=2, transformer={"layernorm_epsilon": 1e-6},
            image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.25))
SIZES = [(16, 16), (32, 24), (8, 28)]  # configured, the whole table (24 < 32 cropped), a thin one


def _save_reference(root: str) -> dict:
    """The folder, and transformers' features (conditioner external, as Nemotron-Omni runs it)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.RadioModel(tf.RadioConfig(**HF))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval().save_pretrained(root)
    model.make_preprocessor_external()
    out = {}
    with torch.no_grad():
        for hw in SIZES:
            x = torch.randn(2, 3, *hw, generator=gen)
            out[hw] = (x, model(x).features)
    return out


def _run(root: str, tp: int, want: dict) -> dict:
    """The node at ``tp`` from the folder: relative error per size; exported to root/export_tp{tp}."""
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.hf import export_node
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    graph = Graph().add("v", NODE, placement={"tp": tp}, init={"hf": root})
    graph.bind("px", "v.pixel_values").output("v.embeddings")
    (model,) = CompositeBuilder(graph, seed=3).build_distributed_models(wrap_with_ddp=False)
    errors = {}
    with torch.no_grad():
        for hw, (x, expected) in want.items():
            got = model.valid.builders["v"].run(model.chunks("v")[0], {"pixel_values": x})["embeddings"]
            errors[hw] = float((got - expected).abs().max() / expected.abs().max())
    export_node(model, "v", f"{root}/../export_tp{tp}")
    model.close()
    return errors


def _tp1(root: str) -> dict:
    import transformers as tf

    want = _save_reference(root)
    errors = _run(root, 1, want)
    model, info = tf.RadioModel.from_pretrained(f"{root}/../export_tp1", output_loading_info=True)
    model.make_preprocessor_external()
    x, expected = want[(32, 24)]
    with torch.no_grad():
        error = float((model.eval()(x).features - expected).abs().max() / expected.abs().max())
    return {"want": want, "errors": errors, "export_error": error, "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]), "norm_mean": model.config.norm_mean}


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = tmp_path_factory.mktemp("radio") / "radio"
    (results,) = run_ranks(1, _tp1, str(root))
    return root, results


@pytest.mark.parametrize("size", SIZES)
def test_imported_tower_matches_transformers_at_every_size(tp1, size):
    _, results = tp1
    assert results["errors"][size] <= REL_TOL, (size, results["errors"][size])


def test_transformers_loads_the_export(tp1):
    """Nothing missing but the input conditioner, which transformers makes from the written norm_mean/std."""
    _, results = tp1
    assert results["unexpected"] == [] and results["missing"] == ["input_conditioner.norm_mean",
                                                                  "input_conditioner.norm_std"], results
    assert results["export_error"] == 0.0
    assert results["norm_mean"] == [0.5, 0.4, 0.3]


@pytest.mark.slow
def test_tp2_equals_transformers_and_exports_the_same_tensors(tp1):
    from safetensors.torch import load_file

    root, results = tp1
    errors = run_ranks(2, _run, str(root), 2, results["want"])
    assert max(max(e.values()) for e in errors) <= REL_TOL, errors
    want, got = (load_file(root.parent / f"export_tp{tp}" / "model.safetensors") for tp in (1, 2))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_pixel_shuffle_is_nemotron_omnis():
    """Against transformers' own function (imported here only for the shuffle: no model is built)."""
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import NemotronH_Omni_Reasoning_V3

    from submodels.radio import shuffled

    features = torch.randn(1, 6 * 4, 5)
    theirs = NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, features.view(1, 6, 4, 5), 0.5).flatten(0, 2)
    assert torch.equal(shuffled(features, 6, 4, 2)[0], theirs)


# --- named errors (no process group) ------------------------------------------------------------

def _edited(root, tmp_path, **fields):
    return edited_folder(root, tmp_path, **fields)


@pytest.mark.parametrize("field, value, named", [
    ("layerscale_value", 0.1, "layerscale_value=0.1 but the node has the node's layers (no layer scale)=1.0"),
    ("use_swiglu_ffn", True, "use_swiglu_ffn=True"), ("num_registers", 4, "num_registers=4 but the node has registers=1")])
def test_a_folder_the_node_cannot_honour_is_named(tp1, tmp_path, field, value, named):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    root, _ = tp1
    with pytest.raises(HFConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        check_folder(builder_of(NODE), _edited(root, tmp_path, **{field: value}), "node 'v'")


@pytest.mark.parametrize("fields, named", [
    ({"layout": "clip", "pixel_shuffle": 2, "activation": "quick_gelu"}, "pixel_shuffle is a field of layout 'radio'"),
    ({"pixel_shuffle": 3}, "multiples of patch_size x pixel_shuffle = 12"),
    ({"num_channels": 1}, "layout 'radio' takes 3 channels")])
def test_radio_fields_are_checked(fields, named):
    from mimo_builder._internal.kinds.config import ModelConfig

    with pytest.raises(ValueError, match=named):
        ModelConfig.from_dict({**NODE, "video_patch_frames": None, "class_tokens": 1, "registers": 0, **fields}
                              if fields.get("layout") == "clip" else {**NODE, **fields})


def test_image_sizes_follow_the_shuffle():
    from mimo_builder._internal.kinds.config import ModelConfig

    config = ModelConfig.from_dict({**NODE, "pixel_shuffle": 2})
    assert (config.num_tokens, config.output_width, config.image_tokens(32, 24)) == (4, 64, 12)
    with pytest.raises(ValueError, match="multiples of patch_size 4 x pixel_shuffle 2 from 8 to 32"):
        config.image_tokens(12, 16)
