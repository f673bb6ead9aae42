"""Interoperation with Megatron-Core's own builders and MIMO (mimo_builder._internal.interop, submodels.mcore_interop).

In: MCore's ``HybridModelConfig`` (object or ``as_dict()``) becomes a one-node graph whose
parameters equal, by name and bitwise from the same seed, both MCore's ``HybridModelBuilder``
build (its parameters drawn as the walker draws them) and the build of the project's own
hand-written MambaConfig; vocabulary padding follows
``should_pad_vocab``. Out: the ``vlm`` graph exported to MCore's ``MimoModel`` gives the same
per-token losses as the project's nodes (cross entropy computed here from their logits). The
builds run in one spawned gloo rank; the refusals are pure (no process group, no module).
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from multirank import run_ranks

SEED, DATA_SEED, BATCH = 7, 3, 2
TOL = 1e-5
VOCAB = 250  # not a multiple of 128: padding shows


# --- configs ----------------------------------------------------------------------------------

def _mcore_hybrid(pad: bool = False, **transformer):
    """An MCore HybridModelConfig as a Megatron user writes it (CPU init, the project's local spec)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.training.models.hybrid import HybridModelConfig

    from submodels.mamba_spec import local_hybrid_stack_spec

    options = dict(num_layers=4, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                   mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, hidden_dropout=0.0,
                   attention_dropout=0.0, use_cpu_initialization=True, **transformer)
    return HybridModelConfig(transformer=TransformerConfig(**options), hybrid_layer_pattern="M*-M",
                             vocab_size=VOCAB, seq_length=64, position_embedding_type="rope",
                             hybrid_stack_spec=local_hybrid_stack_spec(), should_pad_vocab=pad)


def _project_mamba(pad: bool):
    """The same model written as the project's own MambaConfig."""
    from submodels.mamba import MambaConfig

    return MambaConfig(num_layers=4, hidden_size=64, num_attention_heads=4, hybrid_layer_pattern="M*-M",
                       vocab_size=VOCAB, pad_vocab=pad, seq_length=64, position_embedding_type="rope",
                       mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, impl="local")


# --- the one-rank run -------------------------------------------------------------------------

def _one_rank():
    from mimo_builder._internal.platform import compat

    compat.init_runtime("cpu")
    out = {}
    for name, section in (("params", _same_parameters), ("loss", _same_loss)):
        try:
            out[name] = section()
        except Exception:  # noqa: BLE001 - reported by the test that reads this section
            out[name] = {"section_error": traceback.format_exc()}
    return out


def _params(module):
    from mimo_builder._internal.assembly.tp_shard import unwrap

    return {n: p.detach().clone() for n, p in unwrap(module).named_parameters()}


def _graph_params(graph):
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    model = CompositeBuilder(graph, seed=SEED).build_model()
    return model, _params(model.chunks("lm")[0])


def _same_parameters():
    """For each padding choice: MCore's builder, the imported config (object and dict) and the
    project's own config, each as a one-node graph or a direct build from the same seed."""
    from megatron.training.models.hybrid import HybridModelBuilder

    from graphs.mamba_lm import language_model_graph, mamba_lm_from_mcore
    from mimo_builder._internal.platform.compat import seed_rng
    from mimo_builder._internal.document.graph import Placement

    out = {}
    for pad in (False, True):
        mcore = _mcore_hybrid(pad)
        from_object, params = _graph_params(mamba_lm_from_mcore(mcore))
        pgs = from_object.pg_collection("lm")
        seed_rng(SEED)
        builds = {
            "mcore_builder": _params(_drawn_as_the_walker_draws(HybridModelBuilder(mcore).build_model(pgs), pgs)),
            "from_dict": _graph_params(mamba_lm_from_mcore(mcore.as_dict(), impl="local"))[1],
            "project_config": _graph_params(language_model_graph(_project_mamba(pad), Placement()))[1],
        }
        out[pad] = dict(
            count=sum(p.numel() for p in params.values()), tensors=len(params),
            vocab_rows=params["embedding.word_embeddings.weight"].shape[0],
            mismatches={label: sorted(set(params) ^ set(other)) or
                        [k for k in params if not torch.equal(params[k], other[k])]
                        for label, other in builds.items()})
    return out


def _drawn_as_the_walker_draws(model, pgs):
    """``model`` (MCore's own build of node 'lm') with each parameter drawn from SEED as the walker
    draws it (:mod:`mimo_builder._internal.assembly.seeded_init`, the Mamba kind's rules)."""
    from mimo_builder._internal.assembly.seeded_init import init_from_seed
    from submodels.mamba_init import MAMBA_RULES

    return init_from_seed([model], seed=SEED, node="lm", rules=MAMBA_RULES, pg_collection=pgs)[0]


def _same_loss():
    """The vlm graph on one rank and its MimoModel export: per-token losses and the masked mean."""
    from graphs.vlm import vlm
    from mimo_builder._internal.interop import mimo_forward_inputs, to_mimo_model
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    graph = vlm("single")
    model = CompositeBuilder(graph, seed=SEED).build_model()
    mimo = to_mimo_model(model)
    batch = synthetic_batch(model.valid, BATCH, seed=DATA_SEED)
    with torch.no_grad():
        ours = _project_per_token(model, batch)
        theirs, _ = mimo(**mimo_forward_inputs(graph, batch))
        ours_mean = _project_run(model, batch)["loss"]
    mask = batch["loss_mask"]
    return dict(
        per_token_diff=float((ours - theirs).abs().max()), shape=tuple(theirs.shape),
        masked_mean=(float(ours_mean), float((theirs * mask).sum() / mask.sum())),
        params=(sum(p.numel() for p in mimo.parameters()), sum(p.numel() for p in model.parameters())),
        seeded_equal=_state_equal(mimo, to_mimo_model(graph, seed=SEED)))


def _project_run(model, batch, labels=True):
    """The project's nodes run one after the other through their builders."""
    valid = model.valid
    image = valid.builders["vision"].run(model.chunks("vision")[0], {"pixel_values": batch["pixel_values"]})
    image = valid.builders["proj"].run(model.chunks("proj")[0], {"input": image["embeddings"]})["output"]
    inputs = {"input_ids": batch["input_ids"], "image": image}
    if labels:
        inputs.update(labels=batch["labels"], loss_mask=batch["loss_mask"])
    return valid.builders["lm"].run(model.chunks("lm")[0], inputs)


def _project_per_token(model, batch):
    """Per-token cross entropy computed here from the project's logits."""
    logits = _project_run(model, batch, labels=False)["logits"].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           reduction="none").view(batch["labels"].shape)


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


@pytest.fixture(scope="module")
def one_rank():
    (result,) = run_ranks(1, _one_rank, timeout_s=240)
    return result


def _get(result, name):
    if isinstance(result[name], dict) and "section_error" in result[name]:
        pytest.fail(f"section {name!r} raised:\n{result[name]['section_error']}", pytrace=False)
    return result[name]


# --- in: MCore builder configs ----------------------------------------------------------------

@pytest.mark.parametrize("pad", [False, True], ids=["should_pad_vocab=False", "should_pad_vocab=True"])
def test_mcore_hybrid_config_builds_the_same_parameters_as_the_project_config(one_rank, pad):
    result = _get(one_rank, "params")[pad]
    assert result["tensors"] == 31, result
    assert result["mismatches"] == {"mcore_builder": [], "from_dict": [], "project_config": []}


def test_vocab_padding_follows_should_pad_vocab(one_rank):
    """MCore keeps 250 rows unless asked to pad; padded, 250 becomes 256 (divisible by 128)."""
    result = _get(one_rank, "params")
    assert result[False]["vocab_rows"] == VOCAB
    assert result[True]["vocab_rows"] == 256
    assert result[True]["count"] - result[False]["count"] == (256 - VOCAB) * 64 * 2  # embedding + output layer


def test_should_pad_vocab_maps_onto_pad_vocab_and_the_project_default_pads():
    from submodels.mamba import MambaConfig

    assert _from_mcore(_mcore_hybrid(pad=False)).pad_vocab is False
    assert _from_mcore(_mcore_hybrid(pad=True)).pad_vocab is True
    assert MambaConfig.model_fields["pad_vocab"].default is True


def test_parallel_sizes_become_the_placement_and_other_options_pass_through():
    from graphs.mamba_lm import mamba_lm_from_mcore

    graph = mamba_lm_from_mcore(_mcore_hybrid(tensor_model_parallel_size=2, init_method_std=0.01,
                                              add_bias_linear=False))
    node = graph.nodes["lm"]
    assert node.placement.tp == 2
    # init_method_std implies embedding_init_method_std and the init methods: only it is kept
    assert node.config["transformer"] == {"init_method_std": 0.01, "add_bias_linear": False}


@pytest.mark.parametrize("change, named", [
    (dict(rotary_base=500), "rotary_base=500"),
    (dict(hybrid_override_pattern="M*"), "hybrid_override_pattern"),
    (dict(hybrid_stack_spec="custom"), "hybrid_stack_spec"),
], ids=["rotary_base", "deprecated_pattern", "custom_spec"])
def test_fields_the_project_cannot_express_are_named(change, named):
    from mimo_builder._internal.errors import ConfigError
    from submodels.mamba import MambaConfig

    config = _mcore_hybrid()
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=named):
        _from_mcore(config)


def test_a_callable_the_project_cannot_name_is_refused():
    from mimo_builder._internal.errors import ConfigError
    from submodels.mamba import MambaConfig

    with pytest.raises(ConfigError, match="activation_func"):
        _from_mcore(_mcore_hybrid(activation_func=torch.tanh))


def test_unknown_keys_of_the_dict_form_are_listed():
    from mimo_builder._internal.errors import ConfigError
    from submodels.mamba import MambaConfig

    data = _mcore_hybrid().as_dict()
    data["vocab_sise"] = 1
    data["transformer"]["hiden_size"] = 2
    with pytest.raises(ConfigError, match=r"\['vocab_sise'\]"):
        _from_mcore(data)
    del data["vocab_sise"]
    with pytest.raises(ConfigError, match=r"transformer: unknown fields \['hiden_size'\]"):
        _from_mcore(data)


def test_the_dict_form_is_not_imported_by_its_target():
    from mimo_builder._internal.errors import ConfigError
    from submodels.mamba import MambaConfig

    data = {**_mcore_hybrid().as_dict(), "_target_": "os.system"}
    with pytest.raises(ConfigError, match="_target_ is 'os.system'"):
        _from_mcore(data)


# --- out: MCore's MimoModel -------------------------------------------------------------------

def test_vlm_exported_to_mimo_gives_the_same_per_token_loss(one_rank):
    result = _get(one_rank, "loss")
    assert result["shape"][0] == BATCH
    assert result["per_token_diff"] <= TOL, result
    ours, theirs = result["masked_mean"]
    assert abs(ours - theirs) <= TOL * abs(ours), result


def test_exported_mimo_holds_the_same_parameters(one_rank):
    result = _get(one_rank, "loss")
    mimo, ours = result["params"]
    assert mimo == ours == 273_520
    assert result["seeded_equal"]  # a Graph exported from the seed equals the built model's export


def _refusal(graph, world_size, match):
    from mimo_builder._internal.errors import ConfigError
    from mimo_builder._internal.interop import check_exportable

    with pytest.raises(ConfigError, match=match):
        check_exportable(graph, world_size, device="cpu")


def _vlm_like(proj=None):
    from graphs import parts
    from mimo_builder._internal.document.graph import Graph

    return (Graph()
            .add("vision", parts.vision())
            .add("proj", proj or parts.projector())
            .add("lm", parts.backbone(image=parts.IMAGE_TOKEN))
            .connect("vision.embeddings", "proj.input").connect("proj.output", "lm.image")
            .bind("pixel_values", "vision.pixel_values").bind("input_ids", "lm.input_ids")
            .bind("labels", "lm.labels").output("lm.loss"))


def test_the_vlm_graph_on_one_rank_is_exportable():
    from graphs.vlm import vlm
    from mimo_builder._internal.interop import check_exportable

    _, star = check_exportable(vlm("single"), 1, device="cpu")
    assert star.roles() == {"vision": "encoder", "proj": "projection", "lm": "language"}


def test_a_dag_that_is_not_a_star_is_refused():
    from graphs import parts

    graph = _vlm_like().add("proj2", parts.projector())
    graph.edges[0] = "vision.embeddings -> proj2.input"
    graph.connect("proj2.output", "proj.input")  # encoder -> projection -> projection -> language
    _refusal(graph, 1, r"node 'proj': a MimoModel modality is an encoder and at most one projection")


def test_a_projector_on_its_own_ranks_is_refused():
    from mimo_builder._internal.document.graph import Placement

    graph = _vlm_like()
    graph.nodes["proj"].placement = Placement(offset=1, size=1)
    _refusal(graph, 2, r"node 'proj': inside MIMO a projection shares its encoder's grid")


def test_token_reduction_in_a_projector_is_refused():
    from graphs import parts

    _refusal(_vlm_like(proj=parts.projector().model_copy(update={"token_reduction": 17})), 1,
             r"node 'proj': token_reduction 17 cannot be exported to MIMO: MIMO flattens encoder outputs")


def test_non_colocated_placements_are_refused_on_cpu():
    from graphs.vlm import vlm

    _refusal(vlm("disjoint4"), 4, r"node 'vision': .*non-colocated MIMO path runs only with NCCL")


def test_colocated_nodes_with_different_layouts_are_refused_on_cpu():
    from graphs.vlm import vlm

    _refusal(vlm("colocated4"), 4, r"node 'vision': .*ColocatedBridgeCommunicator, which is NCCL-only")


def test_a_builder_without_a_mimo_role_is_refused_by_name():
    from graphs.avlm import avlm

    _refusal(avlm("single"), 1, r"node 'audio': builder AudioBuilder cannot be exported to MIMO as encoder")


def test_pipeline_stages_are_refused():
    from graphs.mamba_lm import mamba_lm

    graph = mamba_lm()
    graph.nodes["lm"].placement.pp = 2
    _refusal(graph, 2, r"node 'lm': pp 2 > 1")


def _from_mcore(config, **kwargs):
    from submodels.mcore_interop import import_hybrid_config

    return import_hybrid_config(config, **kwargs).config


def _export_in_a_fresh_process():
    """to_mimo_model(graph) as the first thing a process does (nothing built or seeded before)."""
    from graphs.vlm import vlm
    from mimo_builder._internal.interop import to_mimo_model

    return sum(p.numel() for p in to_mimo_model(vlm("single"), seed=SEED).parameters())


def test_to_mimo_model_works_in_a_fresh_process():
    (count,) = run_ranks(1, _export_in_a_fresh_process, timeout_s=240)
    assert count > 0
