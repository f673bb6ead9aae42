"""Each CPU workaround in mimo_builder.compat is needed: the scenario fails without it."""

import pytest
import torch

from mimo_builder import compat
from mimo_builder.launch import RankError, launch

SCENARIO_TIMEOUT_S = 180


def _tiny_gpt_train_step(skip: tuple[str, ...]) -> float:
    """Seed, build a small GPTModel, wrap it in MCore DDP, run forward + backward + grad sync."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from mimo_builder.placement import Layout, create_process_groups

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=dist.get_world_size())
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(5)
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
        attention_dropout=0.1,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8,
                     pg_collection=pgs)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model, pg_collection=pgs)
    tokens = torch.randint(0, 32, (2, 8))
    loss = ddp(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    return float(loss)


def _hybrid_stack_with_final_norm(skip: tuple[str, ...]) -> int:
    """Build MCore's HybridStack (one MLP layer) with post_process, i.e. with its final norm."""
    import torch.distributed as dist
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from mimo_builder.placement import Layout, create_process_groups

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=dist.get_world_size())
    pgs = create_process_groups([layout]).for_layout(layout)
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                          linear_fc2=RowParallelLinear))
    layer = ModuleSpec(module=MLPLayer,
                       submodules=TransformerLayerSubmodules(mlp=mlp, mlp_bda=get_bias_dropout_add))
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                               use_cpu_initialization=True)
    stack = HybridStack(config, HybridStackSubmodules(mlp_layer=layer), layer_type_list=["-"],
                        post_process=True, pg_collection=pgs)
    out = stack(torch.randn(4, 2, 16), attention_mask=None)
    return out.numel()


def _tied_embeddings_across_pipeline_stages(skip: tuple[str, ...]) -> int:
    """Build a GPTModel stage with tied embeddings at PP=2: MCore syncs them with Tensor.cuda()."""
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from mimo_builder.placement import Layout, create_process_groups

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=dist.get_world_size(), pp=2)
    pgs = create_process_groups([layout]).for_layout(layout)
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                               use_cpu_initialization=True, pipeline_model_parallel_size=2,
                               pipeline_dtype=torch.float32)
    first = pgs.pp.rank() == 0
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8,
                     pre_process=first, post_process=not first, pg_collection=pgs,
                     share_embeddings_and_output_weights=True)
    return sum(p.numel() for p in model.parameters())


def _run(scenario, skip):
    nproc = 2 if scenario is _tied_embeddings_across_pipeline_stages else 1  # PP=2 needs 2 ranks
    return launch(scenario, nproc, skip, timeout_s=SCENARIO_TIMEOUT_S)[0]


# workaround -> (scenario that needs it, text expected in the failure without it)
NEEDED_BY = {
    "device_queries": (_tiny_gpt_train_step, "NVIDIA driver"),
    "tensor_cuda": (_tied_embeddings_across_pipeline_stages, "NVIDIA driver"),
    "rng_tracker": (_tiny_gpt_train_step, "driver"),
    "global_memory_buffer": (_tiny_gpt_train_step, "global memory buffer is not initialized"),
    "attention_masks": (_tiny_gpt_train_step, "NVIDIA driver"),
    "hybrid_final_norm": (_hybrid_stack_with_final_norm, "Transformer Engine"),
}


def test_every_workaround_has_a_reason_and_a_test():
    assert set(NEEDED_BY) == set(compat.WORKAROUNDS)
    for workaround in compat.WORKAROUNDS.values():
        assert workaround.reason.endswith(".") and "\n" not in workaround.reason


@pytest.mark.parametrize("scenario", [_tiny_gpt_train_step, _hybrid_stack_with_final_norm,
                                      _tied_embeddings_across_pipeline_stages])
def test_scenarios_pass_with_all_workarounds(scenario):
    assert _run(scenario, ()) > 0


@pytest.mark.parametrize("name", sorted(NEEDED_BY))
def test_scenario_fails_without_workaround(name):
    scenario, expected = NEEDED_BY[name]
    with pytest.raises(RankError) as err:
        _run(scenario, (name,))
    assert expected in err.value.trace


def test_cpu_rng_tracker_fork_is_reproducible_and_isolated():
    tracker = compat.CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 11)
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced
    fresh = compat.CPURNGStatesTracker()
    fresh.add("model-parallel-rng", 11)
    with fresh.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), first)
    with pytest.raises(ValueError, match="already tracked"):
        fresh.add("other", 11)


def test_init_runtime_rejects_unknown_workaround_names():
    with pytest.raises(ValueError, match="unknown workaround"):
        compat.init_runtime("cpu", skip=("no_such_thing",))
