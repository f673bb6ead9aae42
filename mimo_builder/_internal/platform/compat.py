"""Make Megatron-Core usable on CPU + gloo; the ONLY place that works around its assumptions.

``init_runtime(device="auto")`` is the entry point. Each workaround in :data:`WORKAROUNDS` names
the MCore behaviour it answers (``reason``) and has a test that fails without it
(``tests/test_compat.py``). On CPU all are installed once; on CUDA only those answering something
CUDA lacks too (``needed_on``), so no CUDA call is ever redirected. ``cpu_scope()`` installs them
for one block (planning on a fake world); ``cuda_factories_on_cpu``, ``gather_objects_within`` and
``give_fresh_adam_its_steps`` serve MCore's optimizer; ``seed_rng`` seeds torch and MCore's RNG
tracker on either device. The pure-torch Mamba kernels live with the Mamba submodel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from mimo_builder._internal.platform.cpu_rng import CPURNGStatesTracker, seed_rng  # noqa: F401 (public here too)
from mimo_builder._internal.platform.cpu_streams import NullStream
from mimo_builder._internal.platform.environment import prepare_mamba_ssm_import, quiet_dependency_warnings  # noqa: F401
from mimo_builder._internal.platform.fusions import CompiledWhenCalled, compiled_at_import
from mimo_builder._internal.platform.patching import Patch, Patches, Workaround  # noqa: F401 (public here too)

def _te_missing(device: torch.device) -> bool:
    return device.type == "cpu" or importlib.util.find_spec("transformer_engine") is None


_process = Patches()  # what init_runtime("cpu") installed for the life of this process


def _cpu_device_queries(patch: Patch) -> None:
    # None, not "cpu": `torch.empty(..., device=None)` honours an enclosing torch.device("meta").
    patch(torch.cuda, "current_device", lambda: None)
    patch(torch.cuda, "current_stream", lambda device=None: NullStream())
    patch(torch.cuda, "Stream", NullStream)
    patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())


def _synchronize_noop(patch: Patch) -> None:
    patch(torch.cuda, "synchronize", lambda device=None: None)


def _tensor_cuda_noop(patch: Patch) -> None:
    patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def _cpu_rng_tracker(patch: Patch) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", CPURNGStatesTracker())
    patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


def _global_memory_buffer(patch: Patch) -> None:
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        patch(parallel_state, "_GLOBAL_MEMORY_BUFFER", GlobalMemoryBuffer())


def _cpu_attention_masks(patch: Patch) -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for module in (utils, fused_softmax):
        patch(module, "get_default_causal_mask", causal_mask)
        patch(module, "get_sliding_window_causal_mask", sliding_window_mask)


def _rotary_cp_split_unpinned(patch: Patch) -> None:
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
        size, rank = cp_group.size(), cp_group.rank()  # MCore's chunks r and 2*cp-1-r, unpinned
        index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1:])
        pos_emb = pos_emb.index_select(seq_dim, index)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        patch(module, "get_pos_emb_on_this_cp_rank", pos_emb_on_this_cp_rank)


def _moe_split_sizes_as_lists(patch: Patch) -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor  # already on the CPU

    for module in (moe_utils, token_dispatcher):
        patch(module, "maybe_move_tensor_to_cpu", move_to_cpu)


def _hybrid_final_norm(patch: Patch) -> None:
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    patch(hybrid_block, "TENorm", WrappedTorchNorm)


class CudaFactoriesOnCpu(TorchFunctionMode):
    """Inside this mode, tensors requested on a CUDA device are made on the CPU, and CPU tensors
    answer ``Tensor.type()`` with the CUDA type name that MCore's checks expect."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs = {**kwargs, "device": "cpu"}
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            return out if out.startswith("torch.cuda.") else "torch.cuda." + out[len("torch."):]
        return out


def _writer_queue_dies_with_rank(patch: Patch) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from mimo_builder._internal.platform.writer_queue import WriterQueue

    patch(filesystem_async, "get_write_results_queue", WriterQueue())


def _adam_step_not_a_state_tensor(patch: Patch) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    patch(DistributedOptimizer, "_set_main_param_and_optimizer_states",
          lambda self, model_param, tensors: set_states(self, model_param, {"step": None, **tensors}))


def _adam_step_per_parameter(patch: Patch) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    load = DistributedOptimizer.load_state_dict

    def load_then_unshare_steps(self, state_dict):
        load(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()

    patch(DistributedOptimizer, "load_state_dict", load_then_unshare_steps)


def _compiled_fusions_eager(patch: Patch) -> None:
    patch(CompiledWhenCalled, "eager", True)
    if compiled_at_import():  # dynamo's import costs seconds: only where MCore's import paid it
        from torch._dynamo import eval_frame

        patch(eval_frame, "_stance", eval_frame.DynamoStance("force_eager"))  # what set_stance sets, undoable


def _torch_adam(device: torch.device) -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _is_cuda(device) -> bool:
    return isinstance(device, int) or torch.device(device).type == "cuda"


WORKAROUNDS: dict[str, Workaround] = {
    w.name: w
    for w in (
        Workaround(
            "device_queries",
            "MCore allocates on torch.cuda.current_device() and orders work on CUDA streams.",
            _cpu_device_queries,
        ),
        Workaround(
            "tensor_cuda",
            "MCore moves tensors with Tensor.cuda() (tied embeddings across pipeline stages).",
            _tensor_cuda_noop,
        ),
        Workaround(
            "rng_tracker",
            "MCore's model-parallel RNG tracker forks CUDA generator states.",
            _cpu_rng_tracker,
        ),
        Workaround(
            "global_memory_buffer",
            "TP layers read a global buffer that only initialize_model_parallel creates (any device).",
            _global_memory_buffer,
            needed_on=lambda device: True,
        ),
        Workaround(
            "attention_masks",
            "The default causal / sliding-window masks are created on device='cuda'.",
            _cpu_attention_masks,
        ),
        Workaround(
            "rotary_cp_split",
            "Under context parallelism MCore's rotary embedding picks each rank's positions with "
            "an index in pinned memory, which needs a CUDA device.",
            _rotary_cp_split_unpinned,
        ),
        Workaround(
            "moe_split_sizes",
            "MoE all-to-all token dispatch turns its split sizes into lists only when it moves "
            "them off a CUDA device; all_to_all_single refuses them as tensors.",
            _moe_split_sizes_as_lists,
        ),
        Workaround(
            "hybrid_final_norm",
            "HybridStack hard-wires TENorm as its final norm, even with a local spec (CPU, or no TE).",
            _hybrid_final_norm,
            needed_on=_te_missing,
        ),
        Workaround(
            "cuda_synchronize",
            "dist_checkpointing calls torch.cuda.synchronize() after staging tensors in host memory.",
            _synchronize_noop,
        ),
        Workaround(
            "writer_queue_dies_with_rank",
            "dist_checkpointing's writer queue lives in a Manager process that outlives a killed rank "
            "(and, spawned, imports torch on the first save).",
            _writer_queue_dies_with_rank,
            needed_on=lambda device: True,
        ),
        Workaround(
            "compiled_fusions_eager",
            "MCore compiles its fused elementwise ops (jit_fuser is torch.compile); on CPU each "
            "process's first call costs seconds of C++ compilation (a ViT's first step 5.9 s vs 0.1 s); "
            "without a GPU they are compiled when first called (platform/fusions.py), so they never are.",
            _compiled_fusions_eager,
        ),
        Workaround(
            "node_scoped_gather",
            "MCore's optimizer aligns parameter groups with an all_gather_object over the whole "
            "world, which hangs when graph nodes live on different ranks.",
            None,
        ),
        Workaround(
            "fresh_adam_steps",
            "MCore's distributed optimizer reads Adam's step from each parameter's state, which "
            "torch's Adam (used without Apex or TE) creates only at its first step.",
            None,
        ),
        Workaround(
            "adam_step_on_load",
            "MCore's distributed optimizer loads every tensor of a parameter's state from the "
            "checkpoint, but torch's Adam (no Apex or TE) keeps its step there, saved elsewhere.",
            _adam_step_not_a_state_tensor,
            needed_on=_torch_adam,
        ),
        Workaround(
            "adam_step_per_parameter",
            "MCore's distributed optimizer, loading into torch's Adam, gives every parameter the "
            "same step tensor, which Adam then advances once per parameter.",
            _adam_step_per_parameter,
            needed_on=_torch_adam,
        ),
        Workaround(
            "cuda_factories",
            "MCore's optimizer and grad clipping create tensors on device='cuda' and require "
            "'torch.cuda.*Tensor' types.",
            None,
        ),
    )
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else is taken as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_runtime(device: str | torch.device = "auto", *, skip: tuple[str, ...] = ()) -> torch.device:
    """Prepare this process for MCore on ``device`` and return the resolved device. Idempotent.
    On CPU the workarounds stay for the life of the process; on CUDA only those CUDA needs too
    (``needed_on``) are installed. ``skip`` leaves some out (the tests that prove each is needed)."""
    resolved = resolve_device(device)
    _check_names(skip)
    if resolved.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    for name, workaround in WORKAROUNDS.items():
        if (name not in skip and name not in _process.applied and workaround.apply is not None
                and workaround.needed_on(resolved)):
            _process.apply(workaround)
    return resolved


def replace_for_process(reason: str, targets) -> None:
    """The fenced way for a submodel to replace another library's attributes for the rest of a CPU
    process (its CPU kernels for mamba-ssm's Triton ones, say): through the process's patches,
    which keep the originals. ``targets``: (owner, name, value) triples; an attribute that already
    holds its value is left alone. ``reason``, one line, says which assumption it answers."""
    for owner, name, value in targets:
        if getattr(owner, name, None) is not value:
            _process.patch(owner, name, value)
    _process.applied.add(reason)


@contextlib.contextmanager
def cpu_scope() -> Iterator[None]:
    """Install the CPU workarounds for a block, then put every original back: for CPU work in a
    process that may later use CUDA (planning on a fake world)."""
    scoped = Patches()
    for name, workaround in WORKAROUNDS.items():
        if name not in _process.applied and workaround.apply is not None:
            scoped.apply(workaround)
    try:
        yield
    finally:
        scoped.undo()


def cuda_factories_on_cpu(device: torch.device, *, skip: tuple[str, ...] = ()):
    """The scope for MCore calls that make tensors on 'cuda' (optimizer, clipping): a
    :class:`CudaFactoriesOnCpu` mode on CPU, nothing at all on CUDA."""
    _check_names(skip)
    if device.type == "cuda" or "cuda_factories" in skip:
        return contextlib.nullcontext()
    return CudaFactoriesOnCpu()


@contextlib.contextmanager
def gather_objects_within(group, *, skip: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside the block, ``torch.distributed.all_gather_object`` without a group gathers over
    ``group`` (a node's ranks) and fills the rest of the world-sized list with this rank's object.

    For building one node's MCore optimizer, whose only world-wide collective merges the
    parameter-group keys of every rank (a union, which the padding leaves unchanged). Needed on
    CPU and CUDA alike, in any graph whose nodes do not all share the same ranks.
    """
    _check_names(skip)
    original = dist.all_gather_object

    def gather(object_list, obj, group_arg=None):
        if group_arg is not None:
            return original(object_list, obj, group=group_arg)
        within = [None] * dist.get_world_size(group)
        original(within, obj, group=group)
        object_list[:] = within + [obj] * (len(object_list) - len(within))

    if "node_scoped_gather" not in skip:
        dist.all_gather_object = gather
    try:
        yield
    finally:
        dist.all_gather_object = original


def give_fresh_adam_its_steps(optimizer, *, skip: tuple[str, ...] = ()) -> None:
    """Before a never-stepped MCore distributed optimizer over torch's Adam (no Apex or TE)
    describes its state for loading: create the state with a zero step, which MCore reads."""
    from megatron.core.optimizer import distrib_optimizer

    _check_names(skip)
    if "fresh_adam_steps" in skip or distrib_optimizer.HAVE_APEX_OR_TE:
        return
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts:
        if isinstance(part, distrib_optimizer.DistributedOptimizer) and part.init_state_fn is not None:
            part.init_state_fn(part.optimizer, part.config)
            for param_state in part.optimizer.state.values():
                param_state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _check_names(skip: tuple[str, ...]) -> None:
    unknown = set(skip) - set(WORKAROUNDS)
    if unknown:
        raise ValueError(f"unknown workaround(s) {sorted(unknown)}; known: {sorted(WORKAROUNDS)}")
