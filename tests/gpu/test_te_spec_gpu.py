"""The Mamba node with Transformer Engine layers (impl='te') against the local spec (impl='local').

Both are built on one CUDA rank; the TE model gets the local model's weights (TE fuses the
pre-norms into the following linear, so three norm names differ: the same renames MCore's
sharded-state-dict key maps apply) and must give the same logits.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="transformer_engine is not installed (pip install -e '.[gpu]')"),
]

# local spec name -> TE spec name (separate norm -> layer_norm_weight of the fused linear)
TE_NAMES = [
    (r"(layers\.\d+)\.norm\.weight$", r"\1.mixer.in_proj.layer_norm_weight"),  # Mamba layer
    (r"(layers\.\d+)\.input_layernorm\.weight$", r"\1.self_attention.linear_qkv.layer_norm_weight"),
    (r"(layers\.\d+)\.pre_mlp_layernorm\.weight$", r"\1.mlp.linear_fc1.layer_norm_weight"),
]


def te_name(key: str) -> str:
    for pattern, replacement in TE_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _logits(impl: str, weights: dict | None):
    from mimo_builder._internal.placement import Layout, create_process_groups
    from mimo_builder._internal.assembly.tp_shard import unwrap
    from submodels.mamba import MambaConfig

    layout = Layout(0, 1)
    pgs = create_process_groups([layout]).for_layout(layout)
    config = MambaConfig(num_layers=3, hidden_size=128, num_attention_heads=4, hybrid_layer_pattern="M*-",
                         vocab_size=256, make_vocab_size_divisible_by=1, seq_length=128, mamba_state_dim=16,
                         mamba_head_dim=32, mamba_num_groups=2, impl=impl)
    builder = config.make_builder()
    (chunk,) = builder.build_distributed_models(pgs, wrap_with_ddp=False)
    core = unwrap(chunk)
    state = {k: v.detach().clone() for k, v in core.state_dict().items() if not k.endswith("_extra_state")}
    if weights is not None:
        renamed = {te_name(k): v for k, v in weights.items()}
        missing, unexpected = core.load_state_dict(renamed, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ids = torch.randint(3, 256, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        return builder.run(chunk, {"input_ids": ids})["logits"].float().cpu(), state


def _compare() -> float:
    from mimo_builder._internal.platform import compat

    compat.init_runtime("auto")
    compat.seed_rng(0)
    local, weights = _logits("local", None)
    te, _ = _logits("te", weights)
    return ((te - local).abs().max() / local.abs().max()).item()


def test_te_spec_gives_the_local_logits():
    from mimo_builder._internal.platform.launch import RankError, launch

    try:
        err = launch(_compare, 1, backend="nccl", timeout_s=120)[0]
    except RankError as e:
        pytest.fail(f"the CUDA rank failed:\n{e.trace}", pytrace=False)
    assert err <= 1e-3, f"TE vs local logits: relative error {err:.2e}"


def _graph(impl: str):
    from mimo_builder._internal.document.graph import Graph
    from submodels.mamba import MambaConfig

    config = MambaConfig(num_layers=3, hidden_size=128, num_attention_heads=4, hybrid_layer_pattern="M*-",
                         vocab_size=256, make_vocab_size_divisible_by=1, seq_length=128, mamba_state_dim=16,
                         mamba_head_dim=32, mamba_num_groups=2, impl=impl)
    return Graph().add("lm", config).bind("input_ids", "lm.input_ids").output("lm.logits")


def _checkpoint_across_specs(folder: str) -> dict[str, float]:
    """A checkpoint written by one spec's build loads into the other's: same logits both ways."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.checkpoint import Checkpointer
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("auto")
    ids = torch.randint(3, 256, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()

    def build(impl, seed):
        (model,) = CompositeBuilder(_graph(impl), seed=seed).build_distributed_models(
            ddp_config=DistributedDataParallelConfig())
        return model

    def logits(model):
        builder = model.valid.configs["lm"].make_builder()
        with torch.no_grad():
            return builder.run(model.chunks("lm")[0], {"input_ids": ids})["logits"].float()

    errors = {}
    for source, target in (("local", "te"), ("te", "local")):
        written = build(source, seed=1)
        Checkpointer(written).save(f"{folder}/{source}", 0)
        loaded = build(target, seed=2)
        Checkpointer(loaded).load(f"{folder}/{source}", with_optimizer=False)
        a, b = logits(written), logits(loaded)
        errors[f"{source}->{target}"] = ((a - b).abs().max() / a.abs().max()).item()
    return errors


def test_a_checkpoint_loads_into_the_other_spec(tmp_path):
    from mimo_builder._internal.platform.launch import RankError, launch

    try:
        errors = launch(_checkpoint_across_specs, 1, str(tmp_path), backend="nccl", timeout_s=180)[0]
    except RankError as e:
        pytest.fail(f"the CUDA rank failed:\n{e.trace}", pytrace=False)
    assert all(err <= 1e-3 for err in errors.values()), errors
