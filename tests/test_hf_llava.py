"""Whole LLaVA models in and out: ``import-hf DIR -o GRAPH.yaml`` writes a graph whose nodes read a
``LlavaForConditionalGeneration`` folder (CLIP tower, LLaVA projector, Mamba2 language model);
the graph trains on a disjoint placement (tower and projector DP2, language model TP2);
``export --as llava`` writes one folder transformers loads, whose logits and greedy tokens are
the project's. Tiny random models made from configs; nothing is downloaded."""

import json

import pytest
import torch
import yaml

from cli_in_process import main_in_process
from multirank import run_ranks

IMAGE_ID, VOCAB, ANSWER = 5, 100, 3  # each row's last ANSWER tokens follow its prompt
IDS = torch.tensor([[1, 5, 5, 5, 5, 7, 8, 9, 10, 11, 12, 13],
                    [2, 5, 5, 5, 5, 20, 21, 22, 23, 24, 25, 26]])
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
NEW = 4
PLACED = {"vision": {"size": 2}, "proj": {"size": 2}, "lm": {"offset": 2, "size": 2, "tp": 2}}


def _save_llava(folder: str, siglip_folder: str) -> None:
    """A LLaVA with a CLIP tower (strategy 'default') and one with a SigLIP tower ('full')."""
    import transformers as tf

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                 patch_size=8)
    text = tf.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=16, head_dim=16,
                           num_heads=8, n_groups=2, expand=2, tie_word_embeddings=False)
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**tower), text_config=text,
                            image_token_index=IMAGE_ID, image_seq_length=4)
    tf.LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    config = tf.LlavaConfig(vision_config=tf.SiglipVisionConfig(**tower), text_config=text, image_token_index=IMAGE_ID,
                            image_seq_length=4, vision_feature_select_strategy="full", vision_feature_layer=-1)
    tf.LlavaForConditionalGeneration(config).eval().save_pretrained(siglip_folder)
    text = tf.NemotronHConfig(vocab_size=VOCAB, hidden_size=64, layers_block_type=[
        "linear_attention", "full_attention", "mlp", "moe"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48)
    config = tf.LlavaConfig(vision_config=tf.SiglipVisionConfig(**tower), text_config=text, image_token_index=IMAGE_ID,
                            image_seq_length=4, vision_feature_select_strategy="full", vision_feature_layer=-1)
    tf.LlavaForConditionalGeneration(config).eval().save_pretrained(f"{siglip_folder}_nemotron")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    run_ranks(1, _save_llava, str(root / "hf"), str(root / "siglip"))
    return root


def test_a_siglip_tower_imports_with_its_layout_and_strategy(llava):
    out = llava / "siglip.yaml"
    result = main_in_process("import-hf", str(llava / "siglip"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    vision = yaml.safe_load(out.read_text())["nodes"]["vision"]["config"]
    assert (vision["layout"], vision["class_token"], vision["feature_select"], vision["feature_layer"],
            vision["activation"]) == ("siglip", False, "full", -1, "gelu_tanh")
    result = main_in_process("validate", str(out))
    assert result.returncode == 0, result.stderr


def _import(llava, name="graph.yaml", folder="hf"):
    out = llava / name
    result = main_in_process("import-hf", str(llava / folder), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out, yaml.safe_load(out.read_text())


def test_import_writes_a_graph_whose_nodes_read_the_folder(llava):
    out, doc = _import(llava)
    assert {n: node["init"]["hf"] for n, node in doc["nodes"].items()} == {n: str(llava / "hf") for n in
                                                                           ("vision", "proj", "lm")}
    vision, lm = doc["nodes"]["vision"]["config"], doc["nodes"]["lm"]["config"]
    assert (vision["feature_layer"], vision["feature_select"], vision["layout"]) == (-2, "default", "clip")
    assert lm["modality_token_ids"] == {"image": IMAGE_ID} and lm["hybrid_layer_pattern"] == "MM"
    assert doc["edges"] == ["vision.embeddings -> proj.input", "proj.output -> lm.image"]
    result = main_in_process("validate", str(out))
    assert result.returncode == 0, result.stderr


def test_a_nemotron_h_language_model_imports_and_validates(llava):
    """Every config.json field the Nemotron-H mapping checks agrees with the written node."""
    out = llava / "nemotron.yaml"
    result = main_in_process("import-hf", str(llava / "siglip_nemotron"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    lm = yaml.safe_load(out.read_text())["nodes"]["lm"]["config"]
    assert (lm["hybrid_layer_pattern"], lm["num_experts"], lm["mlp_activation"]) == ("M*-E", 4, "squared_relu")
    result = main_in_process("validate", str(out), "--world-size", "2")
    assert result.returncode == 0, result.stderr


def test_a_folder_of_another_model_type_is_named(llava, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    result = main_in_process("import-hf", str(folder), "-o", str(tmp_path / "g.yaml"))
    assert result.returncode == 2, result.stderr
    assert "model_type 'qwen2_vl' cannot be imported; supported: ['llava', 'mamba2', 'nemotron_h', 'nemotron_h_omni']" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "g.yaml").exists()


def test_a_config_field_the_kinds_cannot_honour_is_named(llava, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((llava / "hf" / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    config["vision_feature_layer"] = [-2, -1]
    (folder / "config.json").write_text(json.dumps(config))
    result = main_in_process("import-hf", str(folder), "-o", str(tmp_path / "g.yaml"))
    assert result.returncode == 2, result.stderr
    assert "config.json vision_config.hidden_act='relu' is not supported; supported: ['gelu', " in result.stderr


def _batch(ids, pixels):
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    mask = torch.zeros(ids.shape)
    mask[:, -ANSWER - 1:] = 1.0  # the prompt is ids[:, :-ANSWER]
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "pixel_values": pixels}


def _project_and_transformers(doc: str, ckpt: str, out: str, ids, pixels, image_id: int) -> dict:
    """The trained graph's logits and greedy tokens (one rank, checkpoint resharded), and the
    exported folder's in transformers."""
    import transformers as tf

    from mimo_builder._internal.assembly.trained import build_trained
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    graph = load_graph(doc).colocated(1)
    with build_trained(graph, ckpt) as model, torch.no_grad():
        run = {name: (model.valid.builders[name].run, model.chunks(name)[0].eval()) for name in model.valid.order}
        features = run["vision"][0](run["vision"][1], {"pixel_values": pixels})["embeddings"]
        image = run["proj"][0](run["proj"][1], {"input": features})["output"]
        ours = run["lm"][0](run["lm"][1], {"input_ids": ids, "image": image})["logits"]
        tokens = GraphSchedule(model).generate(_batch(ids, pixels), NEW)
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        generated = hf.generate(input_ids=ids[:, :-ANSWER], pixel_values=pixels, max_new_tokens=NEW,
                                do_sample=False, suppress_tokens=[image_id])
    return {"ours": ours, "theirs": theirs, "tokens": tokens, "hf_tokens": generated[:, ids.shape[1] - ANSWER:]}


def _train_export_compare(graph, tmp_path, ids, pixels, image_id: int, vocab: int, nproc: int) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    result = main_in_process("run", str(graph), "--nproc", str(nproc), "--steps", "2", "--batch-size", "4",
                             "--save", str(ckpt))
    assert result.returncode == 0, result.stderr
    result = main_in_process("export", str(graph), "--load", str(ckpt), "-o", str(out), "--as", "llava")
    assert result.returncode == 0, result.stderr
    assert f"llava model: {out} (nodes vision, proj, lm)" in result.stdout
    got = run_ranks(1, _project_and_transformers, str(graph), str(ckpt), str(out), ids, pixels, image_id)[0]
    scale = got["ours"].abs().max()
    assert float((got["ours"][..., :vocab] - got["theirs"]).abs().max() / scale) <= 1e-4
    assert torch.equal(got["tokens"], got["hf_tokens"]), (got["tokens"], got["hf_tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["hf", "siglip"])  # a CLIP tower ('default' strategy), a SigLIP one ('full')
def test_import_train_placed_export_as_llava_gives_transformers_the_same_model(llava, tmp_path, folder):
    graph, doc = _import(llava, f"placed_{folder}.yaml", folder)
    for name, placement in PLACED.items():
        doc["nodes"][name]["placement"] = placement
    graph.write_text(yaml.safe_dump(doc, sort_keys=False))
    _train_export_compare(graph, tmp_path, IDS, PIXELS, IMAGE_ID, VOCAB, nproc=4)


@pytest.mark.slow
def test_the_shipped_llava_graph_exports_with_a_nemotron_h_language_model(tmp_path):
    """graphs/llava.yaml (a hybrid backbone: the LLaVA folder's text model is Nemotron-H)."""
    from graphs import parts

    image = [parts.IMAGE_TOKEN] * 16
    ids = torch.tensor([[3, *image, 7, 8, 9, 10, 11], [4, *image, 20, 21, 22, 23, 24]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _train_export_compare("graphs/llava.yaml", tmp_path, ids, pixels, parts.IMAGE_TOKEN, 256, nproc=1)


def test_export_as_llava_names_a_node_llava_has_no_place_for(tmp_path):
    from graphs.avlm import avlm

    doc = tmp_path / "avlm.yaml"
    doc.write_text(avlm().to_yaml())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                             "--as", "llava")
    assert result.returncode == 2 and "node 'audio' (builder audio) has no place in a LLaVA model" in \
        result.stderr, result.stderr
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                             "--as", "gguf")
    assert result.returncode == 2, result.stderr
    assert "--as 'gguf': no such whole-model format; installed: ['llava', 'mamba2', 'nemotron_h', 'nemotron_h_omni']" in result.stderr
