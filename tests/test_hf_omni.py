"""Nemotron-Omni in and out: ``import-hf DIR -o GRAPH.yaml`` of a ``NemotronH_Omni_Reasoning_V3``
folder (RADIO tower with registers and pixel shuffle, its RMSNorm / squared-ReLU projector, a
Parakeet audio encoder and its projector, a hybrid Nemotron-H language model) gives a graph whose
forward is transformers'; ``export --as nemotron_h_omni`` of a trained checkpoint writes one folder
transformers loads, with the project's logits and greedy tokens. Tiny random models made from
configs; nothing is downloaded. transformers is imported only in spawned ranks."""

import pytest
import torch
import yaml

from cli_in_process import main_in_process
from multirank import run_ranks

IMAGE_ID, AUDIO_ID, VOCAB, ANSWER, NEW, PATCH = 5, 6, 64, 3, 4, 4
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, hybrid_override_pattern="M*-",
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=4,
            mamba_head_dim=8, ssm_state_size=8, n_groups=2, max_position_embeddings=128)
VISION = dict(model_type="radio", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0,
              patch_size=PATCH, image_size=16, max_img_size=32, num_cls_tokens=2, num_registers=1,
              video_temporal_patch_size=2, norm_mean=[0.5, 0.4, 0.3], norm_std=[0.2, 0.3, 0.25])
AUDIO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_mel_bins=16,
             subsampling_conv_channels=4, subsampling_factor=4, conv_kernel_size=3, projection_hidden_size=24,
             projection_bias=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
IMAGE_TOKENS = (16 // PATCH) ** 2 // 4  # a 16 x 16 image: 4 x 4 patches, 2 x 2 after the pixel shuffle
FRAMES, AUDIO_TOKENS = 12, 3  # 12 mel frames subsample 4x to 3 tokens
PLACED = {"vision": {"size": 2}, "proj": {"size": 2}, "audio": {"size": 2}, "audio_proj": {"size": 2},
          "lm": {"offset": 2, "size": 2, "tp": 2}}


def _ids(audio: bool, image_tokens: int = IMAGE_TOKENS, audio_tokens: int = AUDIO_TOKENS, ids=(IMAGE_ID, AUDIO_ID)):
    image, sound = [ids[0]] * image_tokens, [ids[1]] * audio_tokens if audio else []
    return torch.tensor([[3, *image, *sound, 7, 8, 9, 10, 11], [4, *image, *sound, 20, 21, 22, 23, 24]])


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
MELS = torch.randn(2, FRAMES, 16, generator=torch.Generator().manual_seed(4))
TINY = {"ids": (IMAGE_ID, AUDIO_ID), "pixels": PIXELS, "mels": MELS, "patch": PATCH, "vocab": VOCAB}
"""The imported tiny model's inputs."""


def _save_omni(folder: str, audio: bool) -> None:
    """A tiny Omni, every parameter and BatchNorm statistic moved off transformers' init."""
    import transformers as tf
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import NemotronH_Omni_Reasoning_V3

    torch.manual_seed(0)
    config = tf.AutoConfig.for_model("nemotron_h_omni", text_config={"model_type": "nemotron_h", **TEXT},
                                     vision_config=VISION, audio_config=AUDIO if audio else None,
                                     vision_hidden_size=16, projector_hidden_size=40, image_token_id=IMAGE_ID,
                                     audio_token_id=AUDIO_ID, video_token_id=7)
    model = NemotronH_Omni_Reasoning_V3(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("lambda1", "A_log", "dt_bias")):  # dt above time_step_min (see interop.md)
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    model.eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    run_ranks(1, _save_omni, str(root / "image"), False)
    run_ranks(1, _save_omni, str(root / "full"), True)
    return root


def _import(omni, folder: str, name: str = "graph.yaml"):
    out = omni / name
    result = main_in_process("import-hf", str(omni / folder), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out, yaml.safe_load(out.read_text())


def test_import_writes_the_omni_graph(omni):
    _, doc = _import(omni, "full")
    vision, proj, lm = (doc["nodes"][n]["config"] for n in ("vision", "proj", "lm"))
    assert (vision["layout"], vision["class_tokens"], vision["registers"], vision["pixel_shuffle"],
            vision["max_image_size"], vision["video_patch_frames"]) == ("radio", 2, 1, 2, 32, 2)
    assert tuple(vision["image_mean"]) == (0.5, 0.4, 0.3)
    assert (proj["input_size"], proj["ffn_hidden_size"], proj["activation"], proj["norm"]) == (64, 40, "relu2",
                                                                                              "rmsnorm")
    assert lm["modality_token_ids"] == {"image": IMAGE_ID, "audio": AUDIO_ID}
    assert doc["edges"] == ["vision.embeddings -> proj.input", "proj.output -> lm.image",
                            "audio.embeddings -> audio_proj.input", "audio_proj.output -> lm.audio"]
    assert main_in_process("validate", str(omni / "graph.yaml")).returncode == 0


def _patches(pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nemotron-Omni's packed image input: each image's channel-major patches, and its grid."""
    b, c, h, w = pixels.shape
    patches = pixels.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(-1, c * patch * patch), torch.tensor([[h // patch, w // patch]] * b)


def _hf_inputs(ids, audio: bool, case: dict) -> dict:
    patches, grid = _patches(case["pixels"], case["patch"])
    inputs = {"input_ids": ids, "pixel_values": patches, "image_grid_hw": grid}
    return {**inputs, "input_features": case["mels"]} if audio else inputs


def _batch(ids, audio: bool, case: dict) -> dict:
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    mask = torch.zeros(ids.shape)
    mask[:, -ANSWER - 1:] = 1.0  # the prompt is ids[:, :-ANSWER]
    batch = {"input_ids": ids, "labels": labels, "loss_mask": mask, "pixel_values": case["pixels"]}
    return {**batch, "audio_features": case["mels"]} if audio else batch


def _ours(model, ids, audio: bool, case: dict) -> torch.Tensor:
    run = {name: (model.valid.builders[name].run, model.chunks(name)[0].eval()) for name in model.valid.order}
    ports = {"input_ids": ids}
    pairs = [("vision", "proj", "image", {"pixel_values": case["pixels"]})]
    if audio:
        pairs.append(("audio", "audio_proj", "audio", {"features": case["mels"]}))
    for tower, proj, port, inputs in pairs:
        features = run[tower][0](run[tower][1], inputs)["embeddings"]
        ports[port] = run[proj][0](run[proj][1], {"input": features})["output"]
    return run["lm"][0](run["lm"][1], ports)["logits"][..., :case["vocab"]]


def _imported_forward(doc: str, folder: str, audio: bool) -> dict:
    """The imported graph's logits (one rank) and transformers' on the same inputs."""
    import transformers as tf

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    ids = _ids(audio)
    (model,) = CompositeBuilder(load_graph(doc).colocated(1), seed=5).build_distributed_models(wrap_with_ddp=False)
    with torch.no_grad():
        ours = _ours(model, ids, audio, TINY)
    model.close()
    hf = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = hf(**_hf_inputs(ids, audio, TINY)).logits
    return {"ours": ours, "theirs": theirs}


@pytest.mark.parametrize("folder", ["full", pytest.param("image", marks=pytest.mark.slow)])
def test_the_imported_graph_gives_transformers_logits(omni, folder):
    doc, _ = _import(omni, folder, f"{folder}.yaml")
    got = run_ranks(1, _imported_forward, str(doc), str(omni / folder), folder == "full")[0]
    error = float((got["ours"] - got["theirs"]).abs().max() / got["theirs"].abs().max())
    print(f"{folder}: max |ours - transformers| = {error:.1e} of the largest logit")
    assert error <= 1e-5, error


def _trained_and_exported(doc: str, ckpt: str, out: str, ids, case: dict) -> dict:
    """The trained graph's logits and greedy tokens (one rank, checkpoint resharded), and the
    exported folder's in transformers (image and audio)."""
    import transformers as tf

    from mimo_builder._internal.assembly.trained import build_trained
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.runtime.schedule import GraphSchedule

    with build_trained(load_graph(doc).colocated(1), ckpt) as model, torch.no_grad():
        ours = _ours(model, ids, True, case)
        tokens = GraphSchedule(model).generate(_batch(ids, True, case), NEW)
    hf, info = tf.AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    inputs = _hf_inputs(ids, True, case)
    with torch.no_grad():
        theirs = hf.eval()(**inputs).logits
        prompt = {**inputs, "input_ids": ids[:, :-ANSWER]}
        generated = hf.generate(**prompt, max_new_tokens=NEW, do_sample=False, suppress_tokens=list(case["ids"]))
    return {"ours": ours, "theirs": theirs, "tokens": tokens, "hf_tokens": generated[:, ids.shape[1] - ANSWER:],
            "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}


@pytest.mark.slow
def test_import_train_placed_export_gives_transformers_the_same_model(omni, tmp_path):
    """Encoders and projectors DP2, the language model TP2 (4 ranks): trained 2 steps, exported
    ``--as nemotron_h_omni``; transformers loads it with nothing missing, the same logits and the
    same greedy tokens."""
    graph, doc = _import(omni, "full", "placed.yaml")
    for name, placement in PLACED.items():
        doc["nodes"][name]["placement"] = placement
    graph.write_text(yaml.safe_dump(doc, sort_keys=False))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    _train_export_compare(graph, tmp_path, _ids(True), TINY, nproc=4)


def _train_export_compare(graph, tmp_path, ids, case: dict, nproc: int) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    result = main_in_process("run", str(graph), "--nproc", str(nproc), "--steps", "2", "--batch-size", "4",
                             "--save", str(ckpt))
    assert result.returncode == 0, result.stderr
    result = main_in_process("export", str(graph), "--load", str(ckpt), "-o", str(out), "--as", "nemotron_h_omni")
    assert result.returncode == 0, result.stderr
    assert f"nemotron_h_omni model: {out} (nodes " in result.stdout, result.stdout
    got = run_ranks(1, _trained_and_exported, str(graph), str(ckpt), str(out), ids, case)[0]
    assert (got["missing"], got["unexpected"]) == ([], []), got
    scale = got["ours"].abs().max()
    assert float((got["ours"] - got["theirs"]).abs().max() / scale) <= 1e-4
    assert torch.equal(got["tokens"], got["hf_tokens"]), (got["tokens"], got["hf_tokens"])


@pytest.mark.slow
def test_the_shipped_omni_graph_exports_as_nemotron_omni(tmp_path):
    """graphs/omni.yaml, trained from its seed, is transformers' Nemotron-Omni once exported."""
    from graphs import parts

    case = {"ids": (parts.IMAGE_TOKEN, parts.AUDIO_TOKEN), "patch": 8, "vocab": 256,
            "pixels": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
            "mels": torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(6))}
    ids = _ids(True, image_tokens=4, audio_tokens=16, ids=case["ids"])
    _train_export_compare("graphs/omni.yaml", tmp_path, ids, case, nproc=1)


def test_export_as_omni_names_what_does_not_fit(tmp_path):
    from graphs.avlm import avlm

    doc = tmp_path / "avlm.yaml"
    doc.write_text(avlm().to_yaml())
    result = main_in_process("export", str(doc), "--load", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                             "--as", "nemotron_h_omni")
    assert result.returncode == 2, result.stderr
    for named in ("node 'vision_proj' feeds port 'image' but is not a projector with hf_format: nemotron_omni_vision",
                  "node 'vision' must be a RADIO tower", "node 'audio_proj' is fed by node 'audio' (builder audio), "
                  "not a conformer node"):
        assert named in result.stderr, result.stderr


@pytest.mark.parametrize("edit, named", [
    ({"vision_config": {"use_swiglu_ffn": True}}, "config.json vision_config.use_swiglu_ffn=True is not supported"),
    ({"downsample_ratio": 0.3}, "config.json downsample_ratio=0.3: supported are 1 / n"),
    ({"video_pruning_rate": 0.5}, "config.json video_pruning_rate=0.5 is not supported"),
    ({"audio_config": {"hidden_act": "relu"}}, "config.json audio_config.hidden_act='relu' is not supported"),
    ({"text_config": {"model_type": "llama"}}, "config.json text_config.model_type='llama' cannot be imported here")])
def test_import_names_a_field_the_kinds_cannot_honour(omni, tmp_path, edit, named):
    """Exit 2 before any weight is read, the field and what is supported named."""
    import json
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(omni / "full", folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    result = main_in_process("import-hf", str(folder), "-o", str(tmp_path / "g.yaml"))
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "g.yaml").exists()


def _video_features(doc: str, folder: str) -> dict:
    """A 3-frame video through the imported tower and projector (tubelets of 2, the last frame
    repeated), and through transformers' Nemotron-Omni video path."""
    import transformers as tf

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    video = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    (model,) = CompositeBuilder(load_graph(doc).colocated(1), seed=5).build_distributed_models(wrap_with_ddp=False)
    vision, proj = (model.valid.builders[n] for n in ("vision", "proj"))
    tubelets = vision.video_items("pixel_values", video)
    with torch.no_grad():
        features = vision.run(model.chunks("vision")[0].eval(), {"pixel_values": torch.stack(tubelets)})["embeddings"]
        ours = proj.run(model.chunks("proj")[0].eval(), {"input": features})["output"].flatten(0, 1)
    tokens = [vision.item_tokens("pixel_values", tuple(t.shape))["embeddings"] for t in tubelets]
    model.close()
    hf = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = hf.get_video_features(video).pooler_output[0]  # [frames, C, H, W]: one video
    return {"ours": ours, "theirs": theirs, "tubelets": [tuple(t.shape) for t in tubelets], "tokens": tokens}


def test_a_video_runs_as_nemotron_omnis_tubelets(omni):
    """Frames grouped 2 at a time through RADIO's video projection: transformers' video features."""
    doc, _ = _import(omni, "full", "video.yaml")
    got = run_ranks(1, _video_features, str(doc), str(omni / "full"))[0]
    assert got["tubelets"] == [(6, 16, 16), (6, 16, 16)] and got["tokens"] == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert got["ours"].shape == got["theirs"].shape == (2 * IMAGE_TOKENS, 32)
    error = float((got["ours"] - got["theirs"]).abs().max() / got["theirs"].abs().max())
    assert error <= 1e-5, error
