"""Hugging Face Parakeet encoders <-> the conformer node: tiny random transformers models (from
config objects, fp32, no download, every weight and BatchNorm statistic moved off its init)
imported through a graph's ``init: {hf: DIR}`` give transformers' last_hidden_state at TP=1 and
TP=2 for clips of two lengths; a list of clips gives each clip's tokens; the export loads in
transformers; a TP=1 checkpoint of the node starts it at TP=2; a backward pass leaves the
BatchNorm statistics alone.

transformers is imported only inside the spawned rank that builds the reference models.
"""

import json

import pytest
import torch

from hf_folders import assert_same_exports, builder_of, edited_folder
from multirank import run_ranks

SEED, BATCH, REL_TOL = 13, 2, 1e-5
FRAMES = (64, 37)  # factor 8: 8 and 5 tokens; factor 4: 16 and 10
TINY = dict(hidden_size=32, num_attention_heads=4, n_mels=16, subsampling_channels=8, conv_kernel_size=5)
HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_mel_bins=16,
          subsampling_conv_channels=8, conv_kernel_size=5, dropout=0.0, dropout_positions=0.0, layerdrop=0.0,
          activation_dropout=0.0, attention_dropout=0.0)
# node -> (its fields beyond TINY, shared by config.json and the node; folder: ParakeetEncoder or ParakeetForCTC)
NODES = {"encoder": (dict(subsampling_factor=8, attention_bias=False, scale_input=False, conv_bias=True), "encoder"),
         "ctc": (dict(subsampling_factor=4, attention_bias=True, scale_input=True, conv_bias=False), "ctc")}
GRAD_PARAMS = ("subsampling.linear.weight", "layers.0.conv.depthwise_conv.weight", "layers.1.norm_out.weight")
"""Replicated parameters whose gradients TP=2 must give as TP=1 does."""


def _node_config(node: str) -> dict:
    fields = NODES[node][0]
    return dict(builder="conformer", num_layers=2, ffn_hidden_size=64, max_frames=200, **TINY, **fields)


def _hf_fields(node: str) -> dict:
    fields = NODES[node][0]
    return {**HF, "subsampling_factor": fields["subsampling_factor"], "attention_bias": fields["attention_bias"],
            "scale_input": fields["scale_input"], "convolution_bias": fields["conv_bias"]}


def _perturbed(model):
    """Every parameter and BatchNorm statistic moved off transformers' init."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model.eval()


def _save_references(root: str) -> dict:
    """The two folders, and each node's expected output for clips of each length."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers as tf

    torch.manual_seed(SEED)
    encoders = {}
    model = _perturbed(tf.ParakeetEncoder(tf.ParakeetEncoderConfig(**_hf_fields("encoder"))))
    model.save_pretrained(f"{root}/encoder")
    encoders["encoder"] = model
    ctc = tf.ParakeetCTCConfig(encoder_config=_hf_fields("ctc"), vocab_size=12, pad_token_id=11)
    model = _perturbed(tf.ParakeetForCTC(ctc))
    model.save_pretrained(f"{root}/ctc")
    encoders["ctc"] = model.encoder
    gen = torch.Generator().manual_seed(0)
    features = {frames: torch.randn(BATCH, frames, 16, generator=gen) for frames in FRAMES}
    with torch.no_grad():
        want = {(node, frames): encoders[node](x).last_hidden_state for node in NODES for frames, x in features.items()}
    return {"features": features, "want": want}


def _graph(root: str, tp: int, init: str | None = "hf"):
    """Both nodes at ``tp``, from the folders (``init='hf'``), their checkpoints, or the seed (None)."""
    from mimo_builder._internal.document.graph import Graph

    graph = Graph()
    for node, (_, folder) in NODES.items():
        source = {"hf": f"{root}/{folder}", "checkpoint": f"{root}/checkpoint/{node}"}.get(init)
        graph.add(node, _node_config(node), placement={"tp": tp}, init={init: source} if init else None)
        graph.bind(f"features_{node}", f"{node}.features").output(f"{node}.embeddings")
    return graph


def _build(graph):
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(graph, seed=SEED + 3).build_distributed_models(wrap_with_ddp=False)
    return model


def _errors(model, ref: dict) -> dict:
    """Each node's max error at each clip length, relative to the largest reference value."""
    errors = {}
    with torch.no_grad():
        for node in NODES:
            for frames, x in ref["features"].items():
                got = model.valid.builders[node].run(model.chunks(node)[0], {"features": x})["embeddings"]
                want = ref["want"][node, frames]
                errors[f"{node}@{frames}"] = float((got - want).abs().max() / want.abs().max())
    return errors


def _items_error(model, ref: dict) -> float:
    """Clips [64, 37] and [37] as Items: each clip's tokens against the clip run alone, and zero padding."""
    from mimo_builder._internal.runtime.items import Items

    builder, chunk = model.valid.builders["encoder"], model.chunks("encoder")[0]
    long, short = ref["features"][64], ref["features"][37]
    with torch.no_grad():
        out = builder.run(chunk, {"features": Items.of([[long[0], short[0]], [short[1]]])})["embeddings"]
        alone = [builder.run(chunk, {"features": clip[None]})["embeddings"][0]
                 for clip in (long[0], short[0], short[1])]
    want = torch.stack([torch.cat(alone[:2]), torch.cat([alone[2], torch.zeros_like(alone[0])])])
    return float((out - want).abs().max() / want.abs().max()) if out.shape == want.shape else float("inf")


def _backward(model, ref: dict) -> dict:
    """A training-mode forward and backward: missing or non-finite gradients, whether the BatchNorm
    statistics moved, and the gradients of :data:`GRAD_PARAMS`."""
    from mimo_builder._internal.assembly.tp_shard import unwrap

    builder, chunk = model.valid.builders["ctc"], model.chunks("ctc")[0]
    module = unwrap(chunk)
    before = {name: b.clone() for name, b in module.named_buffers()}
    chunk.train()
    builder.run(chunk, {"features": ref["features"][37]})["embeddings"].square().mean().backward()
    chunk.eval()
    params = dict(module.named_parameters())
    return {"bad": sorted(n for n, p in params.items() if p.grad is None or not bool(p.grad.isfinite().all())),
            "stats_moved": sorted(n for n, b in module.named_buffers() if not torch.equal(b, before[n])),
            "grads": {n: params[n].grad.clone() for n in GRAD_PARAMS}}


def _save_checkpoints(model, root: str) -> None:
    """Each node as a bare Megatron-Core checkpoint (dist_checkpointing, keys without node prefix)."""
    import os

    from megatron.core import dist_checkpointing

    from mimo_builder._internal.assembly.tp_shard import unwrap

    for node in NODES:
        os.makedirs(f"{root}/checkpoint/{node}")
        metadata = {"dp_cp_group": model.pg_collection(node).dp_cp}
        state = unwrap(model.chunks(node)[0]).sharded_state_dict(metadata=metadata)
        dist_checkpointing.save(state, f"{root}/checkpoint/{node}")


def _run_graph(root: str, tp: int, ref: dict) -> dict:
    """Build at ``tp`` from the folders: errors, the Items check, exports to ``root/export_tp{tp}``,
    a backward pass; at TP=1 a checkpoint, at TP=2 a build from it and its errors."""
    from mimo_builder._internal.hf import export_node

    model = _build(_graph(root, tp))
    out = {"errors": _errors(model, ref), "items": _items_error(model, ref)}
    for node in NODES:
        export_node(model, node, f"{root}/export_tp{tp}/{node}")
    if tp == 1:
        _save_checkpoints(model, root)
    out["backward"] = _backward(model, ref)
    model.close()
    if tp > 1:
        from_checkpoint = _build(_graph(root, tp, init="checkpoint"))
        out["checkpoint_errors"] = _errors(from_checkpoint, ref)
        from_checkpoint.close()
    out["seeded"] = _seeded_outputs(root, tp, ref)
    return out


def _seeded_outputs(root: str, tp: int, ref: dict) -> dict:
    """Each node's output at 37 frames, built from the graph seed alone (no init)."""
    model = _build(_graph(root, tp, init=None))
    with torch.no_grad():
        out = {node: model.valid.builders[node].run(model.chunks(node)[0], {"features": ref["features"][37]})
               ["embeddings"] for node in NODES}
    model.close()
    return out


def _transformers_reads_exports(root: str, ref: dict) -> dict:
    """Each export in ParakeetEncoder.from_pretrained: missing/unexpected keys and the error at 37 frames."""
    import transformers as tf

    out = {}
    for node in NODES:
        model, info = tf.ParakeetEncoder.from_pretrained(f"{root}/export_tp1/{node}", output_loading_info=True)
        with torch.no_grad():
            got = model.eval()(ref["features"][37]).last_hidden_state
        want = ref["want"][node, 37]
        out[node] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                     "error": float((got - want).abs().max() / want.abs().max())}
    return out


def _tp1(root: str) -> dict:
    ref = _save_references(root)
    results = _run_graph(root, 1, ref)
    return {"ref": ref, **results, "transformers": _transformers_reads_exports(root, ref)}


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = tmp_path_factory.mktemp("parakeet")
    (results,) = run_ranks(1, _tp1, str(root))
    return root, results


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("node", sorted(NODES))
def test_imported_encoder_matches_transformers_at_tp1(tp1, node, frames):
    error = tp1[1]["errors"][f"{node}@{frames}"]
    assert error <= REL_TOL, f"{node} at {frames} frames: max error {error:.2e} of the largest value"


def test_a_list_of_clips_gives_each_clip_its_own_tokens(tp1):
    assert tp1[1]["items"] <= REL_TOL


def test_transformers_loads_the_export(tp1):
    for node, got in tp1[1]["transformers"].items():
        assert (got["missing"], got["unexpected"]) == ([], []), (node, got)
        assert got["error"] <= REL_TOL, (node, got)


def test_backward_leaves_the_batch_norm_statistics(tp1):
    backward = tp1[1]["backward"]
    assert backward["bad"] == [] and backward["stats_moved"] == [], backward


@pytest.mark.slow
def test_tp2_equals_transformers_tp1_exports_and_gradients(tp1):
    root, results = tp1
    ranks = run_ranks(2, _run_graph, str(root), 2, results["ref"])
    for got in ranks:
        assert max(got["errors"].values()) <= REL_TOL, got["errors"]
        assert max(got["checkpoint_errors"].values()) <= REL_TOL, got["checkpoint_errors"]
        assert got["items"] <= REL_TOL
        assert got["backward"]["bad"] == [] and got["backward"]["stats_moved"] == [], got["backward"]
        for node, seeded in got["seeded"].items():  # the same seed gives the same weights at any TP
            assert float((seeded - results["seeded"][node]).abs().max()) <= REL_TOL * float(seeded.abs().max()), node
        for name, grad in got["backward"]["grads"].items():
            want = results["backward"]["grads"][name]
            assert float((grad - want).abs().max()) <= REL_TOL * float(want.abs().max()), name
    assert_same_exports(root, NODES)


# --- named errors and token counts (no process group: config.json and headers only) ------------

def _edited(root, tmp_path, **fields):
    return edited_folder(root / "encoder", tmp_path, **fields)


def test_an_activation_the_kind_lacks_is_named(tp1, tmp_path):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    with pytest.raises(HFConfigError, match=r"hidden_act='relu' but the node has activation='silu'"):
        check_folder(builder_of(_node_config("encoder")), _edited(tp1[0], tmp_path, hidden_act="relu"), "node 'a'")


@pytest.mark.parametrize("fields, named", [
    ({"conv_kernel_size": 7}, r"conv_kernel_size=7 but the node has conv_kernel_size=5"),
    ({"subsampling_conv_channels": 4}, r"subsampling_conv_channels=4 but the node has subsampling_channels=8"),
    ({"num_key_value_heads": 2}, r"num_key_value_heads=2: the conformer has one key/value head per query head"),
])
def test_a_folder_of_another_shape_names_both_fields(tp1, tmp_path, fields, named):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    with pytest.raises(HFConfigError, match=named):
        check_folder(builder_of(_node_config("encoder")), _edited(tp1[0], tmp_path, **fields), "node 'a'")


@pytest.mark.parametrize("prefix", ["audio_tower.", "sound_encoder.encoder."])
def test_an_omni_folder_is_read_under_its_audio_tower(tp1, tmp_path, prefix):
    """A Nemotron-H Omni layout: tensors under ``prefix`` (transformers', or the released
    checkpoints') beside others, the encoder's fields under ``audio_config`` (model_type
    'parakeet', attention_bias and scale_input left to their false defaults)."""
    from safetensors.torch import load_file, save_file

    from mimo_builder._internal.hf import check_folder

    root = tp1[0]
    tensors = {f"{prefix}{k}": v for k, v in load_file(root / "encoder" / "model.safetensors").items()}
    tensors[f"{prefix}feature_extractor.window"] = torch.ones(4)
    tensors["language_model.lm_head.weight"] = torch.zeros(2, 2)
    audio = {k: v for k, v in json.loads((root / "encoder" / "config.json").read_text()).items()
             if k not in ("attention_bias", "scale_input")}
    folder = tmp_path / "omni"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "nemotron_h_omni",
                                                    "audio_config": {**audio, "model_type": "parakeet"}}))
    check_folder(builder_of(_node_config("encoder")), folder, "node 'a'")


@pytest.mark.parametrize("factor, frames, tokens", [(8, 64, 8), (8, 37, 5), (4, 37, 10), (8, 1, 1), (4, 200, 50)])
def test_tokens_per_clip_follow_the_strided_convolutions(factor, frames, tokens):
    builder = builder_of({**_node_config("encoder"), "subsampling_factor": factor})
    assert builder.item_tokens("features", (frames, 16)) == {"embeddings": tokens}
    assert builder.output_tokens({"features": frames}) == {"embeddings": tokens}


@pytest.mark.parametrize("shape, named", [((201, 16), r"a clip of 201 frames: the encoder takes 1 to 200 frames"),
                                          ((0, 16), r"a clip of 0 frames"),
                                          ((40, 12), r"40 frames x 12 mels: the encoder takes 16 mels")])
def test_a_clip_out_of_bounds_is_named(shape, named):
    with pytest.raises(ValueError, match=named):
        builder_of(_node_config("encoder")).item_tokens("features", shape)


@pytest.mark.parametrize("fields, named", [
    ({"num_query_groups": 2}, "num_query_groups 2: the conformer has one key/value head per query head"),
    ({"hidden_dropout": 0.1}, "the conformer node has no dropout"),
    ({"conv_kernel_size": 4}, "conv_kernel_size 4 must be odd"),
    ({"subsampling_factor": 6}, "subsampling_factor 6 must be a power of 2"),
    ({"transformer": {"normalization": "RMSNorm"}}, r"\['normalization'\] do not apply to the conformer"),
])
def test_a_config_the_conformer_cannot_build_is_refused(fields, named):
    from mimo_builder._internal.kinds.config import ModelConfig

    with pytest.raises(ValueError, match=named):
        ModelConfig.from_dict({**_node_config("encoder"), **fields})
