"""Each CPU workaround in mimo_builder._internal.platform.compat is needed: the scenario fails without it."""

import os
import signal
import time

import pytest
import torch

from mimo_builder._internal.platform import compat
from mimo_builder._internal.platform.launch import RankError, launch

SCENARIO_TIMEOUT_S = 180


def _tiny_gpt_train_step(skip: tuple[str, ...]) -> float:
    """Seed, build a small GPTModel, wrap it in MCore DDP, run forward + backward + grad sync."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from mimo_builder._internal.placement import Layout, create_process_groups

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

    from mimo_builder._internal.placement import Layout, create_process_groups

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

    from mimo_builder._internal.placement import Layout, create_process_groups

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


def _mcore_optimizer_step(skip: tuple[str, ...]) -> float:
    """MCore's optimizer (bf16 model, fp32 masters) built and stepped with clipping, as the graph
    optimizer does, for a one-rank node on rank 0 while rank 1 hosts nothing of it."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.projector import ProjectorBuilder, ProjectorConfig

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=1)
    pgs = create_process_groups([layout]).for_layout(layout)
    if pgs is None:  # rank 1: outside the node, like an encoder rank in a disjoint graph
        return 1.0
    compat.seed_rng(5)
    builder = ProjectorBuilder(ProjectorConfig(input_size=8, output_size=8, dtype="bf16"))
    config = builder.transformer_config(pgs)
    module = builder.build_model(pgs)
    module.pg_collection = pgs  # Float16Module reads the pipeline group from it
    model = Float16Module(config, module)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model, pg_collection=pgs)
    options = OptimizerConfig(lr=0.1, bf16=True, params_dtype=torch.bfloat16, clip_grad=0.5)
    with compat.gather_objects_within(pgs.intra_dist_opt, skip=skip), \
            compat.cuda_factories_on_cpu(torch.device("cpu"), skip=skip):
        optimizer = get_megatron_optimizer(options, [ddp], pg_collection=pgs, use_gloo_process_groups=False)
        ddp(torch.randn(4, 3, 8)).float().square().mean().backward()
        ddp.finish_grad_sync()
        ok, norm, _ = optimizer.step()
    assert ok and norm > 0
    return float(norm)


def _checkpoint_save(skip: tuple[str, ...]) -> int:
    """Save a small module with MCore's dist_checkpointing from a launched rank."""
    import tempfile

    from megatron.core import dist_checkpointing

    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.projector import ProjectorBuilder, ProjectorConfig

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=1)
    pgs = create_process_groups([layout]).for_layout(layout)
    module = ProjectorBuilder(ProjectorConfig(input_size=8, output_size=8)).build_model(pgs)
    with tempfile.TemporaryDirectory() as folder:
        dist_checkpointing.save(module.sharded_state_dict(metadata={"dp_cp_group": pgs.dp_cp}), folder)
        return len(os.listdir(folder))


def _async_checkpoint_save(skip: tuple[str, ...]) -> int:
    """Save a small module with MCore's async save (a forked writer) from a launched rank."""
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.projector import ProjectorBuilder, ProjectorConfig

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=1)
    pgs = create_process_groups([layout]).for_layout(layout)
    module = ProjectorBuilder(ProjectorConfig(input_size=8, output_size=8)).build_model(pgs)
    queue = AsyncCallsQueue()
    with tempfile.TemporaryDirectory() as folder:
        queue.schedule_async_request(dist_checkpointing.save(module.sharded_state_dict(
            metadata={"dp_cp_group": pgs.dp_cp}), folder, async_sharded_save=True, async_strategy="mcore"))
        queue.maybe_finalize_async_calls(blocking=True)
        return len(os.listdir(folder))


def _distributed_optimizer_resume(skip: tuple[str, ...]) -> float:
    """Adam under MCore's distributed optimizer: one step, save its sharded state, load it into a
    fresh optimizer, one more step; every parameter's Adam step must then be 2."""
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels.projector import ProjectorBuilder, ProjectorConfig

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=1)
    pgs = create_process_groups([layout]).for_layout(layout)
    builder = ProjectorBuilder(ProjectorConfig(input_size=8, output_size=8))
    metadata = {"dp_cp_group": pgs.dp_cp, "distrib_optim_sharding_type": "fully_reshardable"}

    def build():
        module = builder.build_model(pgs)
        ddp = DistributedDataParallel(builder.transformer_config(pgs),
                                      DistributedDataParallelConfig(use_distributed_optimizer=True), module,
                                      pg_collection=pgs)
        with compat.cuda_factories_on_cpu(torch.device("cpu")):
            optimizer = get_megatron_optimizer(OptimizerConfig(lr=0.1, use_distributed_optimizer=True), [ddp],
                                               pg_collection=pgs, use_gloo_process_groups=False)
        return module, ddp, optimizer

    def step(ddp, optimizer):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(torch.ones(2, 3, 8)).square().mean().backward()
        ddp.finish_grad_sync()
        with compat.cuda_factories_on_cpu(torch.device("cpu")):
            optimizer.step()

    module, ddp, optimizer = build()
    step(ddp, optimizer)
    with tempfile.TemporaryDirectory() as folder:
        model_sd = module.sharded_state_dict(metadata=metadata)
        dist_checkpointing.save(optimizer.sharded_state_dict(model_sd, metadata=metadata), folder)
        module, ddp, optimizer = build()
        model_sd = module.sharded_state_dict(metadata=metadata)
        compat.give_fresh_adam_its_steps(optimizer, skip=skip)
        with compat.cuda_factories_on_cpu(torch.device("cpu")):
            wanted = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
        optimizer.load_state_dict(dist_checkpointing.load(wanted, folder))
    step(ddp, optimizer)
    steps = {float(s["step"]) for part in optimizer.chained_optimizers for s in part.optimizer.state.values()}
    assert steps == {2.0}, f"Adam steps after resuming and one more step: {sorted(steps)} (expected [2.0])"
    return 2.0


def _rotary_embedding_under_cp(skip: tuple[str, ...]) -> int:
    """MCore's rotary embedding with a context-parallel group of 2 ranks: this rank's positions."""
    import torch.distributed as dist
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    compat.init_runtime("cpu", skip=skip)
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, cp_group=dist.group.WORLD)
    return rope(8).shape[0]  # 4 of the 8 positions: chunks r and 3 - r


def _moe_alltoall_dispatch(skip: tuple[str, ...]) -> float:
    """One MoE layer, 4 experts over 2 expert-parallel ranks: all-to-all token dispatch, backward."""
    import torch.distributed as dist
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig

    from mimo_builder._internal.placement import Layout, create_process_groups

    compat.init_runtime("cpu", skip=skip)
    layout = Layout(offset=0, size=dist.get_world_size(), ep=2)
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(5)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, ffn_hidden_size=8,
                               num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                               expert_model_parallel_size=2, add_bias_linear=False, use_cpu_initialization=True)
    layer = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)(config=config, pg_collection=pgs)
    output, _ = layer(torch.randn(6, 2, 8))
    output.square().mean().backward()
    return float(output.detach().abs().sum())


def _writer_queue_process(skip: tuple[str, ...], ready) -> None:
    """In a child process: the writer queue MCore's checkpoint saves use (it starts its server)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    compat.init_runtime("cpu", skip=skip)
    filesystem_async.get_write_results_queue()
    ready.set()
    time.sleep(120)


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _killed_rank_leaves_no_writer(skip: tuple[str, ...]) -> float:
    """A process that started the checkpoint writer's queue is SIGKILLed: its server must go too."""
    import multiprocessing as mp

    import psutil

    context = mp.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_writer_queue_process, args=(skip, ready))
    child.start()
    ready.wait(timeout=60)
    servers = psutil.Process(child.pid).children(recursive=True)  # the queue's server, its resource tracker
    names = {p.pid: " ".join(p.cmdline())[-60:] for p in servers}
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    alive, deadline = servers, time.monotonic() + 10
    while alive and time.monotonic() < deadline:  # a zombie is dead: the tests' subreaper reaps it later
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    for process in alive:  # leave nothing running either way
        process.kill()
    if alive:
        raise RuntimeError(f"the writer queue's server outlived its killed rank: {[(p.pid, names[p.pid]) for p in alive]}")
    return float(len(servers))


TWO_RANKS = ("_tied_embeddings_across_pipeline_stages", "_mcore_optimizer_step", "_rotary_embedding_under_cp",
             "_moe_alltoall_dispatch")


def _fused_gelu_step(skip: tuple[str, ...]) -> float:
    """MCore's fused bias-GeLU (a ViT's MLP) forward and backward, counting what dynamo compiled."""
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl
    from torch._dynamo.utils import counters

    compat.init_runtime("cpu", skip=skip)
    x = torch.randn(4, 8, requires_grad=True)
    bias_gelu_impl(x, torch.zeros(8)).sum().backward()
    if counters["stats"]["unique_graphs"]:
        raise RuntimeError(f"compiled {counters['stats']['unique_graphs']} graphs on CPU")
    return float(x.grad.abs().sum())


def _run(scenario, skip):
    # PP=2, CP=2 and EP=2 need 2 ranks; the optimizer scenario needs a rank outside its node
    nproc = 2 if scenario.__name__ in TWO_RANKS else 1
    # without node_scoped_gather, rank 0 waits in a world-wide gather that rank 1 never joins
    collective_timeout = 10 if scenario is _mcore_optimizer_step else 120
    return launch(scenario, nproc, skip, timeout_s=SCENARIO_TIMEOUT_S, init_timeout_s=collective_timeout)[0]


# workaround -> (scenario that needs it, text expected in the failure without it)
NEEDED_BY = {
    "device_queries": (_tiny_gpt_train_step, "NVIDIA driver"),
    "tensor_cuda": (_tied_embeddings_across_pipeline_stages, "NVIDIA driver"),
    "rng_tracker": (_tiny_gpt_train_step, "driver"),
    "global_memory_buffer": (_tiny_gpt_train_step, "global memory buffer is not initialized"),
    "attention_masks": (_tiny_gpt_train_step, "NVIDIA driver"),
    "hybrid_final_norm": (_hybrid_stack_with_final_norm, "Transformer Engine"),
    "rotary_cp_split": (_rotary_embedding_under_cp, "NVIDIA driver"),
    "moe_split_sizes": (_moe_alltoall_dispatch, "all_to_all_single(): incompatible function arguments"),
    "cuda_factories": (_mcore_optimizer_step, "NVIDIA driver"),
    "node_scoped_gather": (_mcore_optimizer_step, "all_gather_object"),
    "compiled_fusions_eager": (_fused_gelu_step, "graphs on CPU"),
    "cuda_synchronize": (_checkpoint_save, "NVIDIA driver"),
    "writer_queue_dies_with_rank": (_killed_rank_leaves_no_writer, "outlived its killed rank"),
    "fresh_adam_steps": (_distributed_optimizer_resume, "assert len(steps) == 1"),
    "adam_step_on_load": (_distributed_optimizer_resume, "KeyError: 'step'"),
    "adam_step_per_parameter": (_distributed_optimizer_resume, "Adam steps after resuming"),
}


def test_every_workaround_has_a_reason_and_a_test():
    assert set(NEEDED_BY) == set(compat.WORKAROUNDS)
    for workaround in compat.WORKAROUNDS.values():
        assert workaround.reason.endswith(".") and "\n" not in workaround.reason


@pytest.mark.parametrize("scenario", [_tiny_gpt_train_step, _hybrid_stack_with_final_norm,
                                      _tied_embeddings_across_pipeline_stages, _mcore_optimizer_step,
                                      _checkpoint_save, _async_checkpoint_save, _distributed_optimizer_resume,
                                      _rotary_embedding_under_cp, _moe_alltoall_dispatch,
                                      _killed_rank_leaves_no_writer, _fused_gelu_step])
@pytest.mark.slow
def test_scenarios_pass_with_all_workarounds(scenario):
    assert _run(scenario, ()) > 0


@pytest.mark.slow
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


PLANNING_LEAVES_NO_TRACE = """
import torch
from megatron.core.models.hybrid import hybrid_block
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import utils as transformer_utils

def current():
    return dict(current_device=torch.cuda.current_device, Stream=torch.cuda.Stream,
                current_stream=torch.cuda.current_stream, stream=torch.cuda.stream,
                tensor_cuda=torch.Tensor.cuda, te_norm=hybrid_block.TENorm,
                rng_tracker=mcore_random._CUDA_RNG_STATE_TRACKER,
                causal_mask=transformer_utils.get_default_causal_mask)

before = current()
from graphs.avlm import avlm
from mimo_builder import cli
from mimo_builder._internal.planning.plan import make_plan

make_plan(avlm("disjoint4"), 4)
assert cli.main(["plan", "graphs/avlm.yaml", "--world-size", "4"]) == 0
changed = sorted(k for k, v in current().items() if v is not before[k])
assert not changed, f"planning left patches behind: {changed}"
print("untouched")
"""


@pytest.mark.slow
def test_planning_leaves_cuda_and_mcore_untouched():
    """A process that never asked for CPU mode (a GPU rank under torchrun) plans, then finds
    torch.cuda and MCore exactly as they were: the CPU workarounds were scoped to the planning."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PLANNING_LEAVES_NO_TRACE], cwd=root, capture_output=True,
                          text=True, timeout=SCENARIO_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("untouched")


def test_cpu_scope_restores_every_patch():
    before = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream)
    with compat.cpu_scope():
        assert torch.cuda.current_device() is None  # the CPU answer is in place inside
        assert torch.Tensor.cuda is not before[1]
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream) == before


_AUTOTUNER = ("import os, sys, mimo_builder, megatron.core.ssm.mamba_mixer; "
              "kernel = sys.modules['mamba_ssm.ops.triton.ssd_chunk_state']._chunk_cumsum_fwd_kernel; "
              "print(os.environ['TRITON_CACHE_AUTOTUNING'], kernel.cache_results)")


@pytest.mark.slow
@pytest.mark.parametrize("setting, expected", [(None, "1 True"), ("0", "0 False")])
def test_triton_keeps_mamba_ssms_autotuning_results_unless_told_otherwise(setting, expected):
    """The package asks Triton to cache autotuning before mamba-ssm defines its kernels (Triton
    reads the setting then); a user's own setting wins."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_AUTOTUNING"}
    if setting is not None:
        env["TRITON_CACHE_AUTOTUNING"] = setting
    out = subprocess.run([sys.executable, "-c", _AUTOTUNER], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected.split()


def test_the_first_cuda_step_says_it_compiles(monkeypatch):
    from mimo_builder._internal.runtime.train import first_step_notice

    monkeypatch.setenv("TRITON_CACHE_DIR", "/scratch/triton")
    assert first_step_notice() == ("compiling GPU kernels for the first step; later runs reuse the cache "
                                   "(/scratch/triton)")
