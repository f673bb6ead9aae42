"""Checks before a load touches any weight: every rank learns every rank's problems."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from mimo_builder._internal.checkpoint import files
from mimo_builder._internal.checkpoint.files import CheckpointError
from mimo_builder._internal.checkpoint.safe_load import safe_unpickling
from mimo_builder._internal.checkpoint.state import sharded_leaves

MAX_LISTED = 20


def raise_if_any(group, problems: list[str], title: str = "checkpoint does not fit") -> None:
    """Gather ``problems`` from every rank of ``group``; all raise the same CheckpointError."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problems, group=group)
    union = list(dict.fromkeys(p for ps in gathered for p in ps))
    if union:
        more = f"\n  ... and {len(union) - MAX_LISTED} more" if len(union) > MAX_LISTED else ""
        raise CheckpointError(f"{title}:\n" + "\n".join(f"  - {p}" for p in union[:MAX_LISTED]) + more)


def shape_problems(flat: dict, step_dir: Path, describe: Callable[[str], tuple[str, str]]) -> list[str]:
    """Requested tensors that ``step_dir`` lacks or holds with another global shape.

    ``describe(key)`` gives the node a key belongs to and a hint (e.g. how the configs differ).
    Reads only the checkpoint's tensor metadata (call inside ``safe_unpickling``).
    """
    saved = dist_checkpointing.load_tensors_metadata(str(step_dir))
    problems = []
    for leaf in _tensors(flat.values()):
        have = saved.get(leaf.key)
        if have is not None and tuple(have.global_shape) == tuple(leaf.global_shape):
            continue
        node, hint = describe(leaf.key)
        if have is None:
            problems.append(f"node '{node}': the checkpoint has no tensor {leaf.key!r}{hint}")
        else:
            problems.append(f"node '{node}': {leaf.key!r} is {tuple(have.global_shape)} in the checkpoint, "
                            f"{tuple(leaf.global_shape)} here{hint}")
    return problems


def _tensors(leaves: Iterable) -> Iterator[ShardedTensor]:
    for leaf in leaves:
        if isinstance(leaf, ShardedTensorFactory):
            yield from _tensors(sharded_leaves(leaf.build()).values())
        elif isinstance(leaf, ShardedTensor):
            yield leaf


def shard_problems(step_dir: Path) -> list[str]:
    """Files of ``step_dir`` that its dist_checkpointing metadata lists but that are missing or
    shorter than the bytes it places in them (a truncated or deleted shard). Reads the metadata
    only (call inside ``safe_unpickling``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except (OSError, EOFError, ValueError) as err:
        return [f"{step_dir}: its tensor metadata (.metadata) is unreadable: {type(err).__name__}: {err}"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing (the metadata places {size:,} bytes in it)")
        elif path.stat().st_size < size:
            problems.append(f"{path}: {path.stat().st_size:,} bytes, the metadata needs {size:,} (truncated)")
    return problems


def intact_hint(damaged: Path, resume: bool = False) -> str:
    """The newest other step beside ``damaged`` whose manifest reads and whose shards are whole,
    with the ``--load`` that starts from it (``resume``: in place of ``--resume``); or that there is none."""
    found = last_intact(damaged.parent, skip=damaged.name)
    if found is None:
        return f"no other step under {damaged.parent} is intact"
    return f"the last intact step is {found}: --load {found}" + (" in place of --resume" if resume else "")


def last_intact(root: Path, skip: str | None = None) -> Path | None:
    """The newest step folder under ``root`` (other than the one named ``skip``) whose manifest
    reads and whose tensor metadata finds every shard whole; None when there is none."""
    for step_dir in reversed(files.step_folders(root)):
        if step_dir.name == skip:
            continue
        try:
            files.read_manifest(step_dir)
        except CheckpointError:
            continue
        with safe_unpickling():
            if not shard_problems(step_dir):
                return step_dir
    return None
