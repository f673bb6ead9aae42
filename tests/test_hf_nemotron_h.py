"""Hugging Face Nemotron-H (``NemotronHForCausalLM``) <-> the mamba kind with a hybrid pattern.

Tiny random transformers models (built from config objects, fp32, no download) are saved to tmp;
one-node graphs start from them through ``init: {hf: DIR}`` and give transformers' logits at
TP=1, TP=2 (M, *, -) and EP=2 (with E); exports load back into transformers with no missing or
unexpected keys and the same logits. Config fields the kind cannot honour are named errors.
"""

import json

import pytest
import torch

from multirank import run_ranks

SEED, BATCH, TOKENS, VOCAB = 11, 2, 16, 100
REL_TOL = 1e-5
IDS = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
DENSE = dict(builder="mamba", num_layers=4, hybrid_layer_pattern="M*-M", hidden_size=64, num_attention_heads=4,
             num_query_groups=2, ffn_hidden_size=96, vocab_size=VOCAB, seq_length=32, mamba_state_dim=16,
             mamba_head_dim=16, mamba_num_groups=2, mamba_num_heads=8, mlp_activation="squared_relu",
             transformer={"add_bias_linear": False})
MOE = {**DENSE, "hybrid_layer_pattern": "M*-E", "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
       "transformer": {"add_bias_linear": False, "moe_shared_expert_intermediate_size": 48,
                       "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                       "moe_router_topk_scaling_factor": 1.5}}
MAMBA_ONLY = {**DENSE, "num_layers": 2, "hybrid_layer_pattern": "MM"}
CASES = {"dense": DENSE, "moe": MOE, "mamba_only": MAMBA_ONLY}
BLOCKS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _hf_model(pattern: str):
    """A random NemotronHForCausalLM of ``pattern``; norms and the router's correction bias drawn
    too (transformers starts them at ones and zeros, which would hide a misplaced tensor)."""
    import transformers as tf

    config = tf.NemotronHConfig(vocab_size=VOCAB, hidden_size=64, layers_block_type=[BLOCKS[s] for s in pattern],
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                moe_shared_expert_intermediate_size=48, routed_scaling_factor=1.5)
    model = tf.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                tensor.add_(0.2 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return model


def _build(config: dict, **placement):
    import torch.distributed as dist

    from mimo_builder._internal.kinds.config import ModelConfig
    from mimo_builder._internal.placement import Layout, create_process_groups
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    layout = Layout(0, dist.get_world_size(), **placement)
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(SEED, tp_rank=pgs.tp.rank())
    builder = ModelConfig.from_dict(config).make_builder()
    return builder, builder.build_distributed_models(pgs, None, wrap_with_ddp=False), pgs


def _logits(builder, chunk) -> torch.Tensor:
    with torch.no_grad():
        return builder.run(chunk, {"input_ids": IDS})["logits"][..., :VOCAB]


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _reload(folder: str) -> tuple[torch.Tensor, dict]:
    """The export loaded by transformers' Auto class: its logits and loading info."""
    import transformers as tf

    model, info = tf.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    with torch.no_grad():
        return model.eval()(IDS, use_cache=False).logits, {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


def _tp1(root: str) -> dict:
    """On one rank: each reference model saved, imported, compared, exported and reloaded."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from mimo_builder._internal.hf import export_hf, load_hf

    torch.manual_seed(SEED)
    results = {}
    for case, config in CASES.items():
        hf = _hf_model(config["hybrid_layer_pattern"])
        hf.save_pretrained(f"{root}/{case}")
        with torch.no_grad():
            want = hf(IDS, use_cache=False).logits  # an all-Mamba cache fails in transformers 5.24
        builder, chunks, pgs = _build(config)
        load_hf(chunks, builder, f"{root}/{case}", pgs)
        results[case] = {"want": want, "import": _rel(_logits(builder, chunks[0]), want)}
        exported = export_hf(chunks, builder, f"{root}/export_{case}", pgs)
        again, info = _reload(str(exported))
        results[case].update(reload=_rel(again, want), info=info,
                             model_type=json.loads((exported / "config.json").read_text())["model_type"])
    return results


def _from_document(root: str, case: str, placement: dict) -> torch.Tensor:
    """On 2 ranks: a one-node graph starting from ``init: {hf: ...}`` under ``placement``; the
    full logits (TP pieces joined); the node exported to ``export_<case>_<ranks>``."""
    import torch.distributed as dist

    from mimo_builder._internal.assembly.walker import CompositeBuilder
    from mimo_builder._internal.document.graph import Graph
    from mimo_builder._internal.hf import export_node
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    graph = Graph().add("lm", CASES[case], placement=placement, init={"hf": f"{root}/{case}"})
    graph.bind("input_ids", "lm.input_ids").output("lm.logits")
    (model,) = CompositeBuilder(graph, seed=SEED + 5).build_distributed_models(wrap_with_ddp=False)
    with torch.no_grad():
        logits = model.valid.builders["lm"].run(model.chunks("lm")[0], {"input_ids": IDS})["logits"]
    tp = model.pg_collection("lm").tp
    pieces = [torch.empty_like(logits) for _ in range(tp.size())]
    dist.all_gather(pieces, logits.contiguous(), group=tp)
    export_node(model, "lm", f"{root}/export_{case}_{'_'.join(f'{k}{v}' for k, v in placement.items())}")
    return torch.cat(pieces, dim=-1)[..., :VOCAB]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemotron_h")
    (results,) = run_ranks(1, _tp1, str(root))
    return root, results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp1_import_matches_transformers(imported, case):
    _, results = imported
    assert results[case]["import"] <= REL_TOL, f"{case}: max error {results[case]['import']:.2e} of the largest logit"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_in_transformers_with_the_same_logits(imported, case):
    _, results = imported
    info = results[case]["info"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # an all-Mamba pattern read from a nemotron_h folder exports as Mamba2 (the export's one choice)
    assert results[case]["model_type"] == ("mamba2" if case == "mamba_only" else "nemotron_h")
    assert results[case]["reload"] <= REL_TOL, f"{case}: {results[case]['reload']:.2e}"


def _same_files(a, b) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.parametrize("case, placement", [("dense", {"tp": 2}), ("moe", {"ep": 2})], ids=["dense_tp2", "moe_ep2"])
def test_two_rank_import_from_the_document_matches_transformers(imported, case, placement):
    """TP=2 splits heads, Mamba groups and the MLP; EP=2 puts two experts on each rank (the
    loader names them by global index) and the export gathers them back."""
    root, results = imported
    logits = run_ranks(2, _from_document, str(root), case, placement)[0]
    want = results[case]["want"]
    assert _rel(logits, want) <= REL_TOL, f"{case} {placement}: {_rel(logits, want):.2e}"
    suffix = "_".join(f"{k}{v}" for k, v in placement.items())
    assert _same_files(root / f"export_{case}", root / f"export_{case}_{suffix}")  # hence the same reload


# --- mapping choice and named errors (no process group: config.json and the mapping only) -------

def _builder(config):
    from mimo_builder._internal.kinds.config import ModelConfig

    return ModelConfig.from_dict(config).make_builder()


def _folder(tmp_path, config: dict, **fields):
    """A folder whose config.json is the one the node's export writes, with ``fields`` changed
    (None: removed), and a placeholder weights file (config.json is checked first)."""
    from safetensors.torch import save_file

    from mimo_builder._internal.hf.convert import mapping_of

    data = {**mapping_of(_builder(config)).hf_config(), **fields}
    data = {k: v for k, v in data.items() if v is not None}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(data))
    save_file({"placeholder": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_mapping_follows_the_pattern_and_the_folder():
    from mimo_builder._internal.hf.convert import mapping_of

    assert mapping_of(_builder(MAMBA_ONLY)).hf_config()["model_type"] == "mamba2"
    assert mapping_of(_builder(DENSE)).hf_config()["model_type"] == "nemotron_h"
    chosen = mapping_of(_builder(MAMBA_ONLY), {"model_type": "nemotron_h"}).hf_config()
    assert chosen["model_type"] == "nemotron_h" and chosen["layers_block_type"] == ["linear_attention"] * 2
    assert mapping_of(_builder(MAMBA_ONLY), {"model_type": "mamba2"}).hf_config()["model_type"] == "mamba2"


def test_a_legacy_pattern_field_is_read(tmp_path):
    """Older config.json files name the pattern ``hybrid_override_pattern`` (and the blocks
    'mamba'/'attention'): config.json passes, and the check goes on to the tensors."""
    from mimo_builder._internal.hf import HFConfigError, UnknownHFTensorsError, check_folder

    legacy = _folder(tmp_path / "a", DENSE, layers_block_type=None, hybrid_override_pattern="M*-M")
    with pytest.raises(UnknownHFTensorsError, match="placeholder"):
        check_folder(_builder(DENSE), legacy, "node 'lm'")
    renamed = _folder(tmp_path / "b", DENSE, layers_block_type=["mamba", "attention", "mlp", "mamba"])
    with pytest.raises(UnknownHFTensorsError, match="placeholder"):
        check_folder(_builder(DENSE), renamed, "node 'lm'")
    other = _folder(tmp_path / "c", DENSE, layers_block_type=None, hybrid_override_pattern="MM-*")
    with pytest.raises(HFConfigError, match=r"hybrid_override_pattern is the pattern 'MM-\*'"):
        check_folder(_builder(DENSE), other, "node 'lm'")


@pytest.mark.parametrize("fields, message", [
    ({"layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention"]},
     r"layers_block_type is the pattern 'M-\*M' but the node has hybrid_layer_pattern='M\*-M'"),
    ({"mlp_hidden_act": "gelu_pytorch_tanh"}, r"mlp_hidden_act='gelu_pytorch_tanh': the mamba kind's "
                                              r"mlp_activation offers only relu2 \(squared_relu\)"),
    ({"mlp_hidden_act": "relu"}, r"mlp_hidden_act='relu' but the node has mlp_activation='squared_relu'"),
    ({"num_key_value_heads": 4}, r"num_key_value_heads=4 but the node has num_query_groups=2"),
    ({"head_dim": 32}, r"head_dim=32 but the node has transformer.kv_channels=16"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon=1e-06: MCore's Mamba mixer norm uses 1e-05"),
])
def test_config_mismatches_name_the_field(tmp_path, fields, message):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    with pytest.raises(HFConfigError, match=message):
        check_folder(_builder(DENSE), _folder(tmp_path, DENSE, **fields), "node 'lm'")


@pytest.mark.parametrize("fields, message", [
    ({"moe_latent_size": 16}, r"moe_latent_size=16: MoE latent projections \(fc1_latent_proj/fc2_latent_proj\) "
                              r"are not mapped"),
    ({"routed_scaling_factor": 2.5}, r"routed_scaling_factor=2.5 but the node has "
                                     r"transformer.moe_router_topk_scaling_factor=1.5"),
    ({"n_group": 2}, r"n_group=2 but the node has MCore's router without expert groups=1"),
    ({"norm_topk_prob": False}, r"norm_topk_prob=False"),
])
def test_moe_config_mismatches_name_the_field(tmp_path, fields, message):
    from mimo_builder._internal.hf import HFConfigError, check_folder

    with pytest.raises(HFConfigError, match=message):
        check_folder(_builder(MOE), _folder(tmp_path, MOE, **fields), "node 'lm'")


@pytest.mark.parametrize("config, message", [
    ({**DENSE, "share_embeddings_and_output_weights": True}, r"share_embeddings_and_output_weights: .*never ties"),
    ({**DENSE, "position_embedding_type": "rope"}, r"position_embedding_type: .*no position embedding"),
    ({**DENSE, "transformer": {}}, r"transformer.add_bias_linear: .*no bias"),
    ({**MOE, "transformer": {**MOE["transformer"], "moe_router_score_function": "softmax"}},
     r"transformer.moe_router_score_function: .*sigmoid"),
    ({**MOE, "transformer": {**MOE["transformer"], "moe_router_enable_expert_bias": False}},
     r"transformer.moe_router_enable_expert_bias: .*e_score_correction_bias"),
])
def test_node_settings_no_nemotron_h_has_are_named(config, message):
    from mimo_builder._internal.hf import HFWeightsError
    from mimo_builder._internal.hf.convert import mapping_of

    with pytest.raises(HFWeightsError, match=message):
        mapping_of(_builder(config))
