"""One node's training state as Megatron-Core sharded state dicts, named under the node.

A node's model chunks give MCore's ``sharded_state_dict`` (global keys, independent of TP/PP/DP,
so any placement can read them), with the node's name as key prefix: ``lm.decoder.layers.0...``.
Its optimizer gives MCore's own sharded optimizer state over those keys (moments and fp32
masters, ``optimizer.state.exp_avg.lm.decoder...``). What is not a tensor (Adam's step, the
parameter groups) is small and the same on every rank of a node: it travels as JSON in the
checkpoint's manifest, never through the common state that only rank 0 writes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedTensor
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.utils import unwrap_model

from mimo_builder._internal.platform import compat

Path = tuple[Any, ...]

# MCore's optimizers: the distributed optimizer in the format any TP/PP/DP layout reads (its state
# gathered per model parameter), so checkpoints reshard like the plain optimizer's
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                     "chained_optim_avoid_prefix": True}


def model_state(chunks, pg_collection, prefix: str, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The node's sharded model state, one entry per virtual-pipeline chunk, with ``prefix``
    before every key (the node's name and a dot); only the entries whose key ``keep`` accepts
    when given (a LoRA node's adapters, or its base)."""
    state = {}
    for i, chunk in enumerate(chunks):
        sd = unwrap_model(chunk).sharded_state_dict(prefix="", metadata=_metadata(pg_collection))
        if keep is not None:
            sd = {key: value for key, value in sd.items() if keep(key)}
        add_prefix_for_sharding(sd, prefix)
        state[f"chunk{i}"] = sd
    return state


def optimizer_state(optimizer, model_sd: dict, pg_collection, loading: bool) -> dict[str, Any]:
    """MCore's sharded state of the node's optimizer over ``model_sd``'s keys."""
    if loading:
        compat.give_fresh_adam_its_steps(optimizer)
    return optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                        metadata={**_metadata(pg_collection), **_OPTIMIZER_FORMAT})


def _metadata(pg_collection) -> dict[str, Any]:
    return {"dp_cp_group": pg_collection.dp_cp}


def device_kind() -> str:
    """"cuda" in a process that computes on a GPU, else "cpu" (whose generator states differ)."""
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"


def rng_state(rank: int, world_size: int) -> dict[str, ShardedTensor]:
    """This rank's generator states (torch CPU, CUDA where used, MCore's tracker), as one row
    per rank of world-sized tensors: exact resume on the same placement."""
    states = {"torch": torch.get_rng_state()}
    if device_kind() == "cuda":
        states["cuda"] = torch.cuda.get_rng_state().cpu()
    from megatron.core.tensor_parallel import random as mcore_random

    for key, value in mcore_random.get_cuda_rng_tracker().get_states().items():
        states[f"tracker.{key}"] = value.cpu() if torch.is_tensor(value) else torch.as_tensor(value)
    return {key: ShardedTensor.from_rank_offsets(f"rng.{key}", value.unsqueeze(0), (0, rank, world_size))
            for key, value in states.items()}


def restore_rng(loaded: dict[str, torch.Tensor]) -> None:
    """Set this rank's generator states (torch CPU, CUDA, MCore's tracker) from the rows :func:`rng_state` saved."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = {}
    for key, value in loaded.items():
        row = value.squeeze(0)
        if key == "torch":
            torch.set_rng_state(row)
        elif key == "cuda":
            torch.cuda.set_rng_state(row)
        else:
            tracker[key.removeprefix("tracker.")] = row
    if tracker:
        mcore_random.get_cuda_rng_tracker().set_states(tracker)


# --- trees ----------------------------------------------------------------------------------

def leaves(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, value) of every leaf of nested dicts and lists."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, (*path, i))
    else:
        yield path, tree


def set_at(tree: Any, path: Path, value: Any) -> None:
    """Replace the leaf at ``path`` of nested dicts and lists with ``value``, in place."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def sharded_leaves(tree: Any) -> dict[str, ShardedBase]:
    """Every sharded leaf, by its path joined with '/' (what dist_checkpointing is given)."""
    return {_joined(path): leaf for path, leaf in leaves(tree) if isinstance(leaf, ShardedBase)}


def fill(tree: Any, loaded: dict[str, Any]) -> Any:
    """Put loaded tensors back where their sharded leaves were; unwrap local objects."""
    for path, leaf in list(leaves(tree)):
        if isinstance(leaf, ShardedBase):
            set_at(tree, path, loaded[_joined(path)])
        elif isinstance(leaf, LocalNonpersistentObject):
            set_at(tree, path, leaf.unwrap())
    return tree


def _joined(path: Path) -> str:
    return "/".join(map(str, path))


def load_model(chunks, model_state_loaded: dict[str, Any], partial: bool = False) -> None:
    """Copy loaded weights into the node's chunks: every parameter must be there, or with
    ``partial`` (a state :func:`model_state` filtered) every loaded one must have its place."""
    for i, chunk in enumerate(chunks):
        result = unwrap_model(chunk).load_state_dict(model_state_loaded[f"chunk{i}"], strict=not partial)
        if partial and result.unexpected_keys:
            raise KeyError(f"loaded tensors without a place in the model: {result.unexpected_keys[:5]}")


# --- the plain (non-tensor) part ------------------------------------------------------------

def plain_part(tree: Any) -> Any:
    """The JSON-able non-tensor leaves of ``tree`` (same nesting; lists keep their positions)."""
    if isinstance(tree, dict):
        out = {str(k): plain_part(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not _SKIP and v != {}}
    if isinstance(tree, list):
        return [None if v is _SKIP else v for v in map(plain_part, tree)]
    if isinstance(tree, (ShardedBase, LocalNonpersistentObject)):
        return _SKIP
    if torch.is_tensor(tree):
        return tree.item() if tree.numel() == 1 else _SKIP
    if isinstance(tree, tuple):
        return list(tree)
    return tree if tree is None or isinstance(tree, (bool, int, float, str)) else _SKIP


_SKIP = object()


def overlay(fresh: Any, saved: Any) -> Any:
    """``fresh`` (this rank's own plain state) with the values ``saved`` has at the same places,
    plus the keys only ``saved`` has; parameter groups are matched by MCore's identifier keys."""
    if isinstance(fresh, dict) and isinstance(saved, dict):
        for key, value in fresh.items():
            if key == "param_groups" and isinstance(value, list):
                fresh[key] = [_overlay_group(g, saved.get(key, [])) for g in value]
            elif str(key) in saved:
                fresh[key] = overlay(value, saved[str(key)])
        known = {str(k) for k in fresh}
        fresh.update({k: v for k, v in saved.items() if k not in known})  # e.g. Adam's common step
        return fresh
    if isinstance(fresh, (ShardedBase, LocalNonpersistentObject, dict, list)) or saved is None:
        return fresh
    if torch.is_tensor(fresh):
        return torch.full_like(fresh, saved) if fresh.numel() == 1 else fresh
    return tuple(saved) if isinstance(fresh, tuple) else saved


def _overlay_group(group: dict, saved_groups: list[dict]) -> dict:
    ident = _identifier(group)
    for saved in saved_groups:
        if _identifier(saved) == ident:
            return overlay(group, saved)
    return group


def _identifier(group: dict) -> tuple:
    return tuple(_as_plain(group.get(key, group.get(f"pre_{key}"))) for key in param_group_identifier_keys)


def _as_plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def tensor_bytes(tree: Any) -> int:
    """Bytes of the main-replica tensor shards in ``tree`` (what this rank writes)."""
    total = 0
    for _, leaf in leaves(tree):
        data = getattr(leaf, "data", None)
        if isinstance(leaf, ShardedBase) and torch.is_tensor(data) and _is_main(leaf.replica_id):
            total += data.numel() * data.element_size()
    return total


def _is_main(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)
