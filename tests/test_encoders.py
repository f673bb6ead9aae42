"""Vision, audio and projector nodes: MCore builds at TP=1 and TP=2 agree, shapes follow the
ports, the ViT-L/14 preset has CLIP's size, and bad configs fail with the field's name."""

import math

import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks

SEED, BATCH, FRAMES, TOKENS = 1234, 2, 11, 6
NODES = {
    "vision": dict(builder="vision", image_size=16, patch_size=4, num_layers=2, hidden_size=32,
                   num_attention_heads=4),
    "vision_gray": dict(builder="vision", image_size=32, patch_size=8, num_channels=1, class_token=False,
                        num_layers=2, hidden_size=32, num_attention_heads=4, activation="gelu"),
    "audio": dict(builder="audio", n_mels=8, max_frames=16, num_layers=2, hidden_size=32, num_attention_heads=4),
    "audio_learned": dict(builder="audio", n_mels=8, max_frames=16, num_layers=2, hidden_size=32,
                          num_attention_heads=4, position_embedding_type="learned"),
    "projector": dict(builder="projector", input_size=16, output_size=32, ffn_hidden_size=64, token_reduction=2),
    "projector_affine": dict(builder="projector", input_size=16, output_size=32, projector_type="affine"),
}


def _config(name, **overrides):
    from mimo_builder._internal.kinds.config import ModelConfig

    return ModelConfig.from_dict({**NODES[name], **overrides})


def _input(config, tokens=TOKENS):
    gen = torch.Generator().manual_seed(0)
    if config.builder == "vision":
        return torch.randn(BATCH, config.num_channels, config.image_size, config.image_size, generator=gen)
    if config.builder == "audio":
        return torch.randn(BATCH, FRAMES, config.n_mels, generator=gen)
    return torch.randn(BATCH, tokens, config.input_size, generator=gen)


def _groups(tp):
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu")
    layout = Layout(0, dist.get_world_size(), tp=tp)
    return create_process_groups([layout]).for_layout(layout)


def _full_parameters(model, tp_group):
    """Every parameter as its TP=1 master tensor: TP shards gathered along their partition dim."""
    full = {}
    for name, param in model.named_parameters():
        tensor = param.detach().contiguous()
        if getattr(param, "tensor_model_parallel", False) and tp_group.size() > 1:
            assert param.partition_stride == 1, name
            parts = [torch.empty_like(tensor) for _ in range(tp_group.size())]
            dist.all_gather(parts, tensor, group=tp_group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        full[name] = tensor
    return full


def _build_and_run(tp):
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat

    pgs = _groups(tp)
    results = {}
    for name in NODES:
        compat.seed_rng(SEED, tp_rank=pgs.tp.rank())
        config = _config(name)
        (model,) = config.make_builder().build_distributed_models(pgs, DistributedDataParallelConfig())
        with torch.no_grad():
            output = model(_input(config))
        results[name] = dict(output=output, params=_full_parameters(model, pgs.tp), checkpoint=_state_keys(model, pgs))
        if name == "audio":  # move only the last frame: a causal encoder would keep token 0
            features = _input(config)
            features[:, -1] += 10.0
            with torch.no_grad():
                results[name]["token0_change"] = float((model(features) - output)[:, 0].abs().max())
        if name == "projector":  # ragged items' padding: zeros up to a multiple of token_reduction
            odd = _input(config, tokens=TOKENS + 1)
            with torch.no_grad():
                results[name]["odd"] = model(odd)
                results[name]["padded"] = model(torch.nn.functional.pad(odd, (0, 0, 0, 1)))
    return results


def _state_keys(model, pgs):
    """The keys of the node's sharded checkpoint state, or the error that stops it."""
    from mimo_builder._internal.checkpoint.state import model_state

    try:
        return sorted(model_state([model], pgs, "node.")["chunk0"])
    except Exception as err:  # noqa: BLE001 (reported by the test)
        return f"{type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def builds():
    (tp1,) = run_ranks(1, _build_and_run, 1)
    tp2 = run_ranks(2, _build_and_run, 2)
    return tp1, tp2


@pytest.mark.parametrize("name", list(NODES))
def test_tp2_shards_are_slices_of_the_tp1_master_weights(builds, name):
    tp1, tp2 = builds
    for rank in tp2:
        assert rank[name]["params"].keys() == tp1[name]["params"].keys()
        for param, master in tp1[name]["params"].items():
            assert torch.equal(rank[name]["params"][param], master), param


@pytest.mark.parametrize("name", list(NODES))
def test_tp2_output_equals_tp1(builds, name):
    tp1, (rank0, rank1) = builds
    reference = tp1[name]["output"]
    assert torch.equal(rank0[name]["output"], rank1[name]["output"])
    torch.testing.assert_close(rank0[name]["output"], reference, rtol=1e-5, atol=1e-5)
    assert reference.abs().max() > 1e-2  # a real model, not zeros


@pytest.mark.parametrize("name", list(NODES))
def test_every_kind_has_a_sharded_checkpoint_state_at_tp1_and_tp2(builds, name):
    tp1, tp2 = builds
    for state in (tp1[name]["checkpoint"], tp2[0][name]["checkpoint"]):
        assert isinstance(state, list) and state, state
    assert tp2[0][name]["checkpoint"] == tp1[name]["checkpoint"]  # the same keys under any TP


@pytest.mark.parametrize("name", list(NODES))
def test_output_shape_follows_the_ports(builds, name):
    config = _config(name)
    ports = config.make_builder().ports()
    (out_port,) = ports.outputs.values()
    (in_port,) = ports.inputs.values()
    if config.builder == "vision":
        tokens = (config.image_size // config.patch_size) ** 2 + int(config.class_token)
    elif config.builder == "audio":
        tokens = math.ceil(FRAMES / 2)
    else:
        tokens = TOKENS // config.token_reduction
    assert _input(config).dim() == len(in_port.dims)
    assert builds[0][name]["output"].shape == (BATCH, tokens, out_port.features)
    assert out_port.dims[0] == "batch" and len(out_port.dims) == 3


def test_audio_attention_is_bidirectional(builds):
    assert builds[0]["audio"]["token0_change"] > 1e-5  # exactly 0 under a causal mask


def test_projector_pads_tokens_that_token_reduction_does_not_divide(builds):
    """The tokens of ragged items arrive padded to the longest sample; each item's own count is
    checked per item (collator), the padding is merged with zeros."""
    got = builds[0]["projector"]
    assert got["odd"].shape[1] == (TOKENS + 2) // 2
    assert torch.equal(got["odd"], got["padded"])


# --- ViT-L/14 preset -------------------------------------------------------------------------

def _meta_builds():
    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.platform import compat
    from submodels.vision import vit_l14_config

    pgs = _groups(1)
    compat.seed_rng(SEED)
    builder = vit_l14_config(transformer={"init_model_with_meta_device": True}).make_builder()
    (chunk,) = distributed.build_chunks(builder.build_model, builder.transformer_config(pgs), pgs)
    assert all(p.is_meta for p in chunk.parameters())
    count = sum(p.numel() for p in chunk.parameters())
    # A small ViT built on meta and materialized must look its positions up on the real device.
    builder = _config("vision", transformer={"init_model_with_meta_device": True}).make_builder()
    (chunk,) = distributed.build_chunks(builder.build_model, builder.transformer_config(pgs), pgs)
    model = distributed.materialize(chunk, torch.device("cpu"))
    table = model.position_embeddings.weight
    with torch.no_grad():
        table.copy_(torch.arange(table.numel(), dtype=table.dtype).view_as(table))
        looked_up = model.position_embeddings(model.position_ids)[0]
    return count, torch.equal(looked_up, table)


@pytest.fixture(scope="module")
def meta_builds():
    (result,) = run_ranks(1, _meta_builds)
    return result


def test_vit_positions_work_after_meta_init_and_materialize(meta_builds):
    assert meta_builds[1]


def test_vit_l14_preset_has_the_clip_vision_tower_size(meta_builds):
    """Published: CLIP ViT-L/14's image encoder has 304M parameters (the figure quoted for the
    OpenAI checkpoint). OpenAI's VisionTransformer, by the formula below, counts 303,966,208: it
    adds ln_post (2 * 1024) and the 1024 -> 768 output projection, which MCore's CLIPViTModel
    leaves out (it returns every token's hidden state, with ln_pre but no final norm). So MCore
    counts 303,966,208 - 788,480 = 303,177,728; Hugging Face's CLIPVisionModel, which keeps
    ln_post but not the projection, is 2,048 more."""
    measured = meta_builds[0]
    h, ffn, layers, patch, channels = 1024, 4096, 24, 14, 3
    tokens = (224 // patch) ** 2 + 1  # patches + class token
    embedding = channels * patch * patch * h + h + tokens * h  # conv (no bias), class token, positions
    layer = (2 * h                    # LayerNorm before attention
             + 3 * h * h + 3 * h      # fused QKV with bias
             + h * h + h              # attention output projection
             + 2 * h                  # LayerNorm before the MLP
             + h * ffn + ffn          # fc1
             + ffn * h + h)           # fc2
    expected = embedding + 2 * h + layers * layer  # + ln_pre
    assert measured == expected
    ln_post_and_projection = 2 * h + h * 768
    assert abs(measured + ln_post_and_projection - 304e6) < 0.05e6


# --- validation ------------------------------------------------------------------------------

def test_image_size_not_divisible_by_patch_size_names_both_fields():
    from mimo_builder._internal.errors import ConfigError

    with pytest.raises(ConfigError, match="image_size 30 is not divisible by patch_size 4"):
        _config("vision", image_size=30)


def test_tp_problems_name_the_field_that_does_not_split():
    assert _config("vision").tp_problems(2) == []
    assert any("num_attention_heads 4" in p for p in _config("vision").tp_problems(3))
    assert any("num_attention_heads 4" in p for p in _config("audio").tp_problems(8))
    assert _config("projector").tp_problems(2) == []
    assert any("ffn_hidden_size 64" in p for p in _config("projector").tp_problems(3))
    assert any("output_size 32" in p for p in _config("projector_affine").tp_problems(3))


@pytest.mark.parametrize("name, typo, field", [("vision", "patch_sise", "patch_size"),
                                               ("audio", "n_mel", "n_mels"),
                                               ("projector", "token_reductin", "token_reduction")])
def test_unknown_key_names_the_key_and_the_closest_field(name, typo, field):
    from mimo_builder._internal.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(name, **{typo: 1})
    assert repr(typo) in str(err.value) and repr(field) in str(err.value)


def test_projector_refuses_options_it_owns_in_the_transformer_dict():
    from mimo_builder._internal.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_size"):
        _config("projector", transformer={"hidden_size": 8})
