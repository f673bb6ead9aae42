"""Hugging Face SigLIP vision towers <-> the vision node with ``layout: siglip``: tiny random
transformers models (from config objects, fp32, no download) imported through a graph's
``init: {hf: DIR}`` give transformers' hidden states at TP=1 and TP=2, at the configured image
size and, with the position table interpolated, at another; the export loads in transformers.

transformers is imported only inside the spawned rank that builds the reference models.
"""


import pytest
import torch

from hf_folders import assert_same_exports, builder_of, edited_folder
from multirank import run_ranks

SEED, BATCH, REL_TOL = 11, 2, 1e-5
HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=18,
          patch_size=4)  # 4 x 4 patches, 2 pixels dropped per side (as so400m-patch14-384's 27 x 27)
SIGLIP = dict(builder="vision", layout="siglip", class_token=False, activation="gelu_tanh", image_size=18,
              patch_size=4, num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
              transformer={"layernorm_epsilon": 1e-6})
# node -> (its config beyond SIGLIP, folder, its output: transformers' hidden_states[i], None: last_hidden_state)
NODES = {"last": ({"ln_post": True}, "vision", None),      # SiglipVisionModel ('head.*' skipped)
         "full": ({}, "siglip", -1),                        # SiglipModel: 'vision_model.*', text tower left
         "llava": ({"feature_layer": -2}, "llava", -2)}     # LLaVA: 'vision_tower.*', language model left
SIZES = {"configured": (18, 18), "other": (24, 20)}  # 4 x 4 patches; 6 x 5, positions interpolated


def _perturbed(model):
    """Every parameter moved off transformers' init (zero biases, unit norms would hide mistakes)."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _save_references(root: str) -> dict:
    """The three folders, and each node's expected output at both sizes."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers as tf

    torch.manual_seed(SEED)
    vision = tf.SiglipVisionConfig(**HF)  # vision_use_head: true, so 'head.*' is in the folders
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    towers = {}
    model = _perturbed(tf.SiglipVisionModel(vision))
    model.save_pretrained(f"{root}/vision")
    towers["vision"] = model
    model = _perturbed(tf.SiglipModel(tf.SiglipConfig(vision_config=HF, text_config={**text, "bos_token_id": 1,
                                                                                       "eos_token_id": 2})))
    model.save_pretrained(f"{root}/siglip")
    towers["siglip"] = model.vision_model
    llama = tf.LlamaConfig(**text, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)
    model = _perturbed(tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=llama,
                                                                       image_token_index=3)))
    model.save_pretrained(f"{root}/llava")
    towers["llava"] = model.model.vision_tower
    gen = torch.Generator().manual_seed(0)
    pixels = {size: torch.randn(BATCH, 3, *hw, generator=gen) for size, hw in SIZES.items()}
    want = {}
    with torch.no_grad():
        for node, (_, folder, layer) in NODES.items():
            for size, x in pixels.items():
                res = towers[folder](x, output_hidden_states=True, interpolate_pos_encoding=size == "other")
                want[node, size] = res.last_hidden_state if layer is None else res.hidden_states[layer]
    return {"pixels": pixels, "want": want}


def _graph(root: str, tp: int):
    from mimo_builder._internal.document.graph import Graph

    graph = Graph()
    for node, (extra, folder, _) in NODES.items():
        graph.add(node, {**SIGLIP, **extra}, placement={"tp": tp}, init={"hf": f"{root}/{folder}"})
        graph.bind(f"pixels_{node}", f"{node}.pixel_values").output(f"{node}.embeddings")
    return graph


def _run_graph(root: str, tp: int, ref: dict) -> dict:
    """Build the graph at ``tp`` (weights from the folders), each node's relative error at each
    size, and each node exported to ``root/export_tp{tp}/<node>``."""
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.hf import export_node
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(_graph(root, tp), seed=SEED + 3).build_distributed_models(wrap_with_ddp=False)
    errors = {}
    with torch.no_grad():
        for node in NODES:
            for size, x in ref["pixels"].items():
                got = model.valid.builders[node].run(model.chunks(node)[0], {"pixel_values": x})["embeddings"]
                want = ref["want"][node, size]
                errors[f"{node}@{size}"] = float((got - want).abs().max() / want.abs().max())
    for node in NODES:
        export_node(model, node, f"{root}/export_tp{tp}/{node}")
    model.close()
    return errors


def _transformers_reads_exports(root: str, ref: dict) -> dict:
    """Each export in SiglipVisionModel.from_pretrained: missing/unexpected keys, and the error of
    the output that matches the node's (last_hidden_state with ln_post, else hidden_states[-1])."""
    import transformers as tf

    out = {}
    for node, (extra, _, _) in NODES.items():
        model, info = tf.SiglipVisionModel.from_pretrained(f"{root}/export_tp1/{node}", output_loading_info=True)
        with torch.no_grad():
            res = model.eval()(ref["pixels"]["other"], output_hidden_states=True, interpolate_pos_encoding=True)
        got = res.last_hidden_state if extra.get("ln_post") else res.hidden_states[-1]
        want = ref["want"][node, "other"]
        out[node] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                     "use_head": model.config.vision_use_head,
                     "error": float((got - want).abs().max() / want.abs().max())}
    return out


def _tp1(root: str) -> dict:
    ref = _save_references(root)
    errors = _run_graph(root, 1, ref)
    return {"ref": ref, "errors": errors, "transformers": _transformers_reads_exports(root, ref)}


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    (results,) = run_ranks(1, _tp1, str(root))
    return root, results


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("node", sorted(NODES))
def test_imported_tower_matches_transformers_at_tp1(tp1, node, size):
    _, results = tp1
    error = results["errors"][f"{node}@{size}"]
    assert error <= REL_TOL, f"{node} at {SIZES[size]}: max error {error:.2e} of the largest value"


def test_transformers_loads_the_export(tp1):
    """No missing or unexpected keys (``vision_use_head: false``; a node without ``ln_post``
    writes a freshly initialised ``post_layernorm``), the same outputs."""
    _, results = tp1
    for node, got in results["transformers"].items():
        assert (got["missing"], got["unexpected"], got["use_head"]) == ([], [], False), (node, got)
        assert got["error"] <= REL_TOL, (node, got)


@pytest.mark.slow
def test_tp2_import_from_the_document_equals_transformers_and_tp1(tp1):
    root, results = tp1
    errors = run_ranks(2, _run_graph, str(root), 2, results["ref"])
    assert max(max(e.values()) for e in errors) <= REL_TOL, errors
    assert_same_exports(root, NODES)


# --- named errors (no process group: config.json and headers only) --------------------------

def _edited(root, tmp_path, **fields):
    return edited_folder(root / "vision", tmp_path, **fields)


def test_a_clip_node_on_a_siglip_folder_is_told_the_layout(tp1):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    root, _ = tp1
    clip = {**{k: v for k, v in SIGLIP.items() if k not in ("layout", "class_token")}, "image_size": 16}
    with pytest.raises(HFConfigError, match=r"model_type='siglip_vision_model' but the node has layout='clip'.*"
                                            r"set layout: siglip, class_token: false"):
        check_folder(builder_of(clip), root / "vision", "node 'v'")


def test_an_activation_the_kind_lacks_is_named(tp1, tmp_path):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    root, _ = tp1
    with pytest.raises(HFConfigError, match=r"hidden_act='relu'.*the vision kind has no such activation"):
        check_folder(builder_of(SIGLIP), _edited(root, tmp_path, hidden_act="relu"), "node 'v'")


def test_a_folder_of_another_size_names_the_field(tp1, tmp_path):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    root, _ = tp1
    with pytest.raises(HFConfigError, match=r"layer_norm_eps=1e-05 but the node has transformer.layernorm_epsilon"):
        check_folder(builder_of(SIGLIP), _edited(root, tmp_path, layer_norm_eps=1e-5), "node 'v'")


def test_siglip_layout_with_a_class_token_is_refused():
    from mimo_builder._internal.kinds.config import ModelConfig

    with pytest.raises(ValueError, match="layout 'siglip' has no class token; set class_token: false"):
        ModelConfig.from_dict({**SIGLIP, "class_token": True})


def test_only_siglip_drops_a_remainder_of_the_image():
    from mimo_builder._internal.kinds.config import ModelConfig

    assert ModelConfig.from_dict(SIGLIP).num_tokens == 16
    clip = {k: v for k, v in SIGLIP.items() if k not in ("layout", "class_token")}
    with pytest.raises(ValueError, match="image_size 18 is not divisible by patch_size 4"):
        ModelConfig.from_dict(clip)
