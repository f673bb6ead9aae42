"""Hugging Face weights: tiny random transformers models (built from config objects, saved to
tmp, no download) load into the project's nodes with the same outputs; TP=2 import through
``init: {hf: DIR}`` equals TP=1; export -> import is bitwise; bad folders are named errors.

transformers is imported only inside the spawned rank that builds the reference models (its
import takes several seconds); the other tests read the folders that rank saved.
"""

import json
import os
import shutil
import time

import pytest
import torch

from multirank import run_ranks

SEED, BATCH, TOKENS = 7, 2, 16
REL_TOL = 1e-5
MAMBA = dict(builder="mamba", num_layers=2, hybrid_layer_pattern="MM", hidden_size=64, num_attention_heads=1,
             vocab_size=100, seq_length=32, mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2,
             mamba_num_heads=8)
CLIP = dict(builder="vision", image_size=16, patch_size=4, num_layers=3, hidden_size=32, num_attention_heads=4,
            ffn_hidden_size=64)
WHISPER = dict(builder="audio", n_mels=8, max_frames=16, num_layers=2, hidden_size=32, num_attention_heads=4,
               ffn_hidden_size=64, features_layout="mels_frames")


def _save_reference_models(root: str) -> dict:
    """Tiny random HF models saved under ``root``; their outputs on fixed inputs."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers as tf

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (BATCH, TOKENS), generator=gen)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=gen)
    mels = torch.randn(BATCH, 8, 16, generator=gen)
    out = {"inputs": {"ids": ids, "pixels": pixels, "mels": mels}}
    for tied in (True, False):
        config = tf.Mamba2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16,
                                 n_groups=2, num_heads=8, expand=2, tie_word_embeddings=tied)
        model = tf.Mamba2ForCausalLM(config).eval()
        model.save_pretrained(f"{root}/mamba_{tied}")
        out[f"mamba_{tied}"] = model(ids).logits.detach()
    clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=16, patch_size=4)).eval()
    clip.save_pretrained(f"{root}/clip")
    res = clip(pixels, output_hidden_states=True)
    out["clip_last"], out["clip_minus2"] = res.last_hidden_state.detach(), res.hidden_states[-2].detach()
    out["clip_post"] = clip.post_layernorm(res.last_hidden_state).detach()
    whisper = tf.WhisperModel(tf.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                               encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8,
                                               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                                               vocab_size=64, max_target_positions=16, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    whisper.save_pretrained(f"{root}/whisper")  # encoder + decoder: the node reads 'encoder.*'
    out["whisper"] = whisper.encoder(mels).last_hidden_state.detach()
    out["hf_reads_export"] = {}
    return out


def _build(config: dict, tp: int = 1, seed: int = SEED):
    import torch.distributed as dist

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.kinds.config import ModelConfig
    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu")
    layout = Layout(0, dist.get_world_size(), tp=tp)
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(seed, tp_rank=pgs.tp.rank())
    builder = ModelConfig.from_dict(config).make_builder()
    return builder, builder.build_distributed_models(pgs, None, wrap_with_ddp=False), pgs


def _node_output(builder, chunks, inputs) -> torch.Tensor:
    with torch.no_grad():
        if builder.config.builder == "mamba":
            return builder.run(chunks[0], {"input_ids": inputs["ids"]})["logits"][..., :100]
        return chunks[0](inputs["pixels"] if builder.config.builder == "vision" else inputs["mels"])


def _import_and_compare(root: str) -> dict:
    """On one rank: every reference model imported into its node, outputs and round trips."""
    from mimo_builder._internal.hf import export_hf, load_hf

    start = time.perf_counter()
    ref = _save_reference_models(root)
    seconds = {"transformers": time.perf_counter() - start}
    cases = {"mamba_tied": ({**MAMBA, "share_embeddings_and_output_weights": True}, "mamba_True", "mamba_True"),
             "mamba_untied": (MAMBA, "mamba_False", "mamba_False"),
             "clip_last": (CLIP, "clip", "clip_last"),
             "clip_minus2": ({**CLIP, "feature_layer": -2}, "clip", "clip_minus2"),
             "clip_post": ({**CLIP, "ln_post": True}, "clip", "clip_post"),
             "whisper": (WHISPER, "whisper", "whisper")}
    results = {}
    for case, (config, folder, want) in cases.items():
        builder, chunks, pgs = _build(config)
        load_hf(chunks, builder, f"{root}/{folder}", pgs)
        got = _node_output(builder, chunks, ref["inputs"])
        expected = ref[want]
        results[case] = float((got - expected).abs().max() / expected.abs().max())
        if case == "mamba_untied":
            results["mamba_untied_logits"] = got
        exported = export_hf(chunks, builder, f"{root}/export_{case}", pgs)
        other, fresh, _ = _build(config, seed=SEED + 1)  # other random weights, overwritten
        load_hf(fresh, other, exported, pgs)
        again = export_hf(fresh, other, f"{root}/again_{case}", pgs)
        results[f"{case}_params_equal"] = _same_params(chunks[0], fresh[0])
        results[f"{case}_files_equal"] = _same_files(exported, again)
    results["transformers_reads_export"] = _transformers_reads_export(root, ref)
    results["shape_error"] = _shape_error(root)
    results["seconds"] = {**seconds, "total": time.perf_counter() - start}
    return results


def _shape_error(root: str) -> str:
    """The error of loading a folder whose final norm has 63 entries into a 64-wide node."""
    from safetensors.torch import load_file, save_file

    from mimo_builder._internal.hf import HFShapeError, load_hf

    folder = f"{root}/bad_shape"
    shutil.copytree(f"{root}/mamba_False", folder)
    tensors = load_file(f"{folder}/model.safetensors")
    save_file({**tensors, "backbone.norm_f.weight": torch.ones(63)}, f"{folder}/model.safetensors")
    builder, chunks, pgs = _build(MAMBA)
    try:
        load_hf(chunks, builder, folder, pgs)
    except HFShapeError as err:
        return str(err)
    return "no error"


def _same_params(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def _same_files(a, b) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _transformers_reads_export(root: str, ref: dict) -> dict:
    """Exported folders load back into transformers with the reference outputs."""
    import transformers as tf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    inputs = ref["inputs"]
    mamba = tf.Mamba2ForCausalLM.from_pretrained(f"{root}/export_mamba_untied").eval()
    clip = tf.CLIPVisionModel.from_pretrained(f"{root}/export_clip_post").eval()
    whisper = WhisperEncoder.from_pretrained(f"{root}/export_whisper").eval()
    with torch.no_grad():
        got = {"mamba": mamba(inputs["ids"]).logits, "clip": clip(inputs["pixels"]).last_hidden_state,
               "whisper": whisper(inputs["mels"]).last_hidden_state}
    want = {"mamba": ref["mamba_False"], "clip": ref["clip_last"], "whisper": ref["whisper"]}
    return {k: float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in got}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    (results,) = run_ranks(1, _import_and_compare, str(root))
    return root, results


@pytest.mark.parametrize("case", ["mamba_tied", "mamba_untied", "clip_last", "clip_minus2", "clip_post", "whisper"])
def test_imported_node_matches_transformers(imported, case):
    _, results = imported
    assert results[case] <= REL_TOL, f"{case}: max error {results[case]:.2e} of the largest value"


@pytest.mark.parametrize("case", ["mamba_tied", "mamba_untied", "clip_minus2", "clip_post", "whisper"])
def test_export_then_import_is_bitwise(imported, case):
    _, results = imported
    assert results[f"{case}_params_equal"] and results[f"{case}_files_equal"]


def test_transformers_loads_the_export_with_the_same_outputs(imported):
    _, results = imported
    assert max(results["transformers_reads_export"].values()) <= REL_TOL, results["transformers_reads_export"]


def _tp2_from_document(root: str) -> torch.Tensor:
    """On 2 ranks: an lm graph whose node starts from ``init: {hf: ...}`` at TP=2; full logits."""
    import torch.distributed as dist

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.hf import export_node
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    config = {**MAMBA, "num_attention_heads": 2}  # MCore wants heads divisible by TP even without attention
    graph = Graph().add("lm", config, placement={"tp": 2}, init={"hf": f"{root}/mamba_False"})
    graph.bind("input_ids", "lm.input_ids").output("lm.logits")
    (model,) = CompositeBuilder(graph, seed=SEED + 5).build_distributed_models(wrap_with_ddp=False)
    ids = torch.randint(0, 100, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.valid.builders["lm"].run(model.chunks("lm")[0], {"input_ids": ids})["logits"]
    pieces = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(pieces, logits.contiguous(), group=model.pg_collection("lm").tp)
    export_node(model, "lm", f"{root}/export_tp2")
    return torch.cat(pieces, dim=-1)[..., :100]


def test_tp2_import_from_the_document_equals_tp1(imported):
    root, results = imported
    logits = run_ranks(2, _tp2_from_document, str(root))[0]
    from safetensors.torch import load_file

    want = load_file(f"{root}/export_mamba_untied/model.safetensors")
    got = load_file(f"{root}/export_tp2/model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    tp1 = results["mamba_untied_logits"]
    assert float((logits - tp1).abs().max() / tp1.abs().max()) <= REL_TOL


# --- named errors (no process group: folder, config.json and headers only) ------------------

def _builder(config):
    from mimo_builder._internal.kinds.config import ModelConfig

    return ModelConfig.from_dict(config).make_builder()


def _edited_copy(root, tmp_path, drop=(), add=None, config=None):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(root / "mamba_False", folder)
    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if k not in drop}
    save_file({**tensors, **(add or {})}, folder / "model.safetensors")
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


def test_unknown_tensors_are_named(imported, tmp_path):
    from mimo_builder._internal.hf import UnknownHFTensorsError, check_folder

    root, _ = imported
    extra = {f"backbone.layers.0.mixer.extra_{i}": torch.zeros(1) for i in range(15)}
    folder = _edited_copy(root, tmp_path, add=extra)
    with pytest.raises(UnknownHFTensorsError, match=r"15 tensor\(s\).*'backbone.layers.0.mixer.extra_0'.*and 3 more"):
        check_folder(_builder(MAMBA), folder, "node 'lm'")


def test_missing_tensors_are_named(imported, tmp_path):
    from mimo_builder._internal.hf import MissingHFTensorsError, check_folder

    root, _ = imported
    folder = _edited_copy(root, tmp_path, drop=("backbone.layers.1.mixer.D", "lm_head.weight"))
    with pytest.raises(MissingHFTensorsError, match=r"node 'lm'.*'backbone.layers.1.mixer.D', 'lm_head.weight'"):
        check_folder(_builder(MAMBA), folder, "node 'lm'")


def test_config_mismatch_names_both_fields(imported):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    root, _ = imported
    with pytest.raises(HFConfigError, match=r"tie_word_embeddings=True but the node has "
                                            r"share_embeddings_and_output_weights=False"):
        check_folder(_builder(MAMBA), root / "mamba_True", "node 'lm'")


def test_document_with_a_mismatched_folder_fails_validation(imported):
    from mimo_builder._internal.errors import GraphError
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.validation import validate_graph

    root, _ = imported
    graph = Graph().add("vision", {**CLIP, "hidden_size": 64}, init={"hf": str(root / "clip")})
    with pytest.raises(GraphError, match=r"node 'vision' init.hf.*hidden_size=32 but the node has hidden_size=64"):
        validate_graph(graph)
    with pytest.raises(GraphError, match=r"node 'vision' init.hf.*no config.json"):
        validate_graph(Graph().add("vision", CLIP, init={"hf": str(root)}))


def test_shape_mismatch_names_the_tensor_and_both_shapes(imported):
    _, results = imported
    assert "backbone.norm_f.weight (63,) cannot make decoder.final_norm.weight (64,)" in results["shape_error"]


def test_unreadable_hugging_face_files_are_named(tmp_path):
    """A config.json that is not JSON (or not an object), or a truncated safetensors file, is an
    HFWeightsError naming the file, not a traceback."""
    from mimo_builder._internal.hf import files
    from mimo_builder._internal.hf.mapping import HFWeightsError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFWeightsError, match="config.json cannot be read as JSON"):
        files.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(HFWeightsError, match="config.json holds a list, not a JSON object"):
        files.read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\"")
    with pytest.raises(HFWeightsError, match="model.safetensors cannot be read as safetensors"):
        files.tensor_shapes(tmp_path)
