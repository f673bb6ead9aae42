"""The same model from a seed at every placement: every shipped kind built from one seed at tp2,
pp2 and ep2 has bit for bit the full weights it has on one rank, drawn as MCore draws them."""

import math
import re

import pytest
import torch

from multirank import run_ranks

SEED, VOCAB = 7, 64
KINDS = ("vision", "vproj", "audio", "aproj", "lm", "gpt", "radio", "rproj")
PLACEMENTS = {"tp2": {name: {"tp": 2} for name in KINDS}, "pp2": {"lm": {"pp": 2}}, "ep2": {"lm": {"ep": 2}}}
"""Two ranks each; nodes not named run data-parallel on both."""


def _graph(placement: str):
    from mimo_builder._internal.document.graph import Graph, Placement
    from submodels.audio import AudioConfig
    from submodels.gpt import GPTConfig
    from submodels.mamba import MambaConfig
    from submodels.projector import ProjectorConfig
    from submodels.vision import VisionConfig

    where = PLACEMENTS.get(placement, {})
    small = dict(hidden_size=32, num_attention_heads=4)
    configs = {
        "vision": VisionConfig(num_layers=2, image_size=16, patch_size=8, **small),
        "vproj": ProjectorConfig(input_size=32, output_size=32, ffn_hidden_size=64),
        "audio": AudioConfig(num_layers=2, n_mels=8, max_frames=16, position_embedding_type="learned", **small),
        "aproj": ProjectorConfig(input_size=32, output_size=32, projector_type="affine"),
        "lm": MambaConfig(num_layers=6, hybrid_layer_pattern="M*-EM-", vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                          seq_length=32, mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, num_experts=4,
                          moe_ffn_hidden_size=16, share_embeddings_and_output_weights=True,
                          transformer={"add_bias_linear": False},  # MoE layers train without biases here
                          modality_token_ids={"image": 1, "audio": 2}, **small),
        "gpt": GPTConfig(num_layers=2, vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_length=32,
                         position_embedding_type="learned_absolute", share_embeddings_and_output_weights=False,
                         **small),
        "radio": VisionConfig(layout="radio", num_layers=2, image_size=16, patch_size=4, max_image_size=32,
                              class_tokens=2, registers=1, pixel_shuffle=2, video_patch_frames=2,
                              activation="gelu", **small),
        "rproj": ProjectorConfig(input_size=128, output_size=32, ffn_hidden_size=64, activation="relu2",
                                 norm="rmsnorm", hf_format="nemotron_omni_vision",
                                 transformer={"add_bias_linear": False}),
    }
    graph = Graph()
    for name, config in configs.items():
        graph.add(name, config, placement=Placement(**where.get(name, {})))
    return (graph.connect("vision.embeddings", "vproj.input").connect("audio.embeddings", "aproj.input")
            .connect("vproj.output", "lm.image").connect("aproj.output", "lm.audio")
            .bind("pixel_values", "vision.pixel_values").bind("audio_features", "audio.features")
            .connect("radio.embeddings", "rproj.input").bind("radio_pixels", "radio.pixel_values")
            .bind("input_ids", "lm.input_ids").bind("gpt_ids", "gpt.input_ids")
            .output("lm.logits").output("gpt.logits").output("rproj.output"))


def _built(placement: str) -> dict[str, torch.Tensor]:
    """On each rank: the graph built from SEED; this rank's nodes' full weights by whole-model name."""
    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    builder = CompositeBuilder(_graph(placement), seed=SEED)
    with builder.build_distributed_models(wrap_with_ddp=False, mixed_precision_wrapper=None)[0] as model:
        return _full_weights(model)


def _full_weights(model) -> dict[str, torch.Tensor]:
    """``node/name`` -> full tensor: TP shards joined along their partition dim (part by part),
    layers and experts under their names in the one-rank model."""
    from mimo_builder._internal.assembly.tp_shard import unshard, unwrap

    out = {}
    for node in model.valid.order:
        if not model.hosts(node):
            continue
        pgs = model.pg_collection(node)
        for chunk in map(unwrap, model.chunks(node)):
            modules = dict(chunk.named_modules())
            for key, param in chunk.named_parameters():
                group = pgs.tp if getattr(param, "allreduce", True) else pgs.expt_tp
                shape = list(param.shape)
                if getattr(param, "tensor_model_parallel", False):
                    shape[param.partition_dim] *= group.size()
                out[f"{node}/{_one_rank_name(key, param, modules)}"] = unshard(param, torch.Size(shape), group)
    return out


def _one_rank_name(key: str, param, modules: dict) -> str:
    if getattr(param, "shared_embedding", False):  # a later stage's copy of the tied embedding
        return "embedding.word_embeddings.weight"
    expert = re.match(r"(.*)\.local_experts\.(\d+)\.(.*)", key)
    if expert:
        experts = modules[expert[1]]
        index = experts.ep_group.rank() * experts.num_local_experts + int(expert[2])
        key = f"{expert[1]}.local_experts.{index}.{expert[3]}"
    layer = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if layer:
        key = f"decoder.layers.{modules[f'decoder.layers.{layer[1]}'].layer_number - 1}.{layer[2]}"
    return key


def _merged(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Every rank's tensors in one dict; a tensor two ranks hold (replicas, the tied embedding) must agree."""
    out = {}
    for part in per_rank:
        for key, value in part.items():
            assert key not in out or torch.equal(out[key], value), f"{key} differs between ranks"
            out[key] = value
    return out


def _reference() -> tuple[dict, dict]:
    """On one rank: the graph's full weights, and each node as MCore alone draws it from SEED."""
    from mimo_builder._internal.placement import create_process_groups
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.validation import validate_graph

    weights = _built("single")
    valid = validate_graph(_graph("single"), 1)
    groups = create_process_groups(valid.layouts.values())
    mcore = {}
    for node in KINDS:
        seed_rng(SEED)
        (chunk,) = valid.builders[node].build_distributed_models(
            groups.for_layout(valid.layouts[node]), wrap_with_ddp=False, mixed_precision_wrapper=None)
        mcore.update({f"{node}/{k}": p.detach().clone() for k, p in chunk.named_parameters()})
    groups.destroy()
    return weights, mcore


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _reference)[0]


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_a_seed_gives_the_same_full_weights_at_every_placement(reference, placement):
    expected, _ = reference
    got = _merged(run_ranks(2, _built, placement))
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:8]
    differ = {k: float((got[k].float() - v.float()).abs().max()) if got[k].shape == v.shape else "shape"
              for k, v in expected.items() if not torch.equal(got[k], v)}
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ at {placement}: {differ}"
    assert {k.split("/")[0] for k in expected} == set(KINDS)


def test_the_seeded_weights_keep_mcores_distributions(reference):
    """Pooled over layers, each parameter family has MCore's mean and spread; constants stay as MCore
    sets them; Mamba's A and dt stay in MCore's ranges; no two parameters share their draws."""
    seeded, mcore = reference
    assert seeded.keys() == mcore.keys()
    families: dict[str, list[str]] = {}
    for key in seeded:
        families.setdefault(re.sub(r"\.\d+\.", ".*.", key), []).append(key)
    for family, keys in families.items():
        ours, theirs = (torch.cat([d[k].flatten().float() for k in keys]) for d in (seeded, mcore))
        if bool((theirs == theirs[0]).all()):
            assert torch.equal(ours, theirs), family
        elif theirs.numel() >= 128:  # within 4 standard errors of MCore's draw
            ratio, shift = float(ours.std() / theirs.std()), float((ours.mean() - theirs.mean()) / theirs.std())
            assert abs(ratio - 1) < 4 / math.sqrt(2 * len(ours)), (family, ratio)
            assert abs(shift) < 4 * math.sqrt(2 / len(ours)), (family, shift)
    a = torch.cat([v.exp() for k, v in seeded.items() if k.endswith("A_log")])
    dt = torch.nn.functional.softplus(torch.cat([v for k, v in seeded.items() if k.endswith("dt_bias")]))
    assert 1 <= float(a.min()) and float(a.max()) <= 16 and 1e-3 <= float(dt.min()) and float(dt.max()) <= 0.1 + 1e-6
    random = [v.flatten()[:16] for v in seeded.values() if v.numel() >= 16 and not bool((v == v.flatten()[0]).all())]
    assert len({tuple(v.tolist()) for v in random}) == len(random)
    assert math.isclose(float(seeded["lm/decoder.layers.0.mixer.in_proj.weight"].std()), 0.02, rel_tol=0.2)
