"""A checkpoint directory: atomic step folders, a ``latest`` pointer and a JSON manifest.

::

    ROOT/latest                 "step_0000006" (replaced atomically after a step is complete)
    ROOT/step_0000006/mimo.json the manifest: step, data position, graph document, placements,
                                per-node optimizer scalars and scheduler position, sizes
    ROOT/step_0000006/...       Megatron-Core dist_checkpointing files (torch_dist)

A step is written into ``ROOT/.step_0000006.partial`` and renamed once every rank has written
its shards and the manifest is on disk, so a save that dies midway leaves the previous step and
``latest`` untouched; the next save removes the leftover folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.placement import Layout

FORMAT = 1
MANIFEST = "mimo.json"
DATA = "data"  # the data stream's state per chunk
LATEST = "latest"


class CheckpointError(MimoError, ValueError):
    """A checkpoint is missing, malformed or does not fit the graph; names what differs."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRecord(_Record):
    """The LoRA adapters a checkpoint holds of one node: what a load must be asked for again."""

    rank: int
    alpha: float
    """The scale's numerator as used (the document's ``alpha``, or the rank where it had none)."""
    targets: list[str] | None
    """The adapted layers' names, sorted (None: every linear layer; the builder did not list them)."""


class NodeRecord(_Record):
    """What a checkpoint holds of one node."""

    builder: str
    placement: dict[str, int]
    """The node's layout when saved (offset, size, tp, cp, pp, ep, etp)."""

    @field_validator("placement")
    @classmethod
    def _whole_layout(cls, value: dict[str, int]) -> dict[str, int]:
        missing = [k for k in ("offset", "size", "tp", "cp", "pp", "ep") if k not in value]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        bad = [f"{k} {v}" for k, v in value.items() if v < (0 if k == "offset" else 1)]
        if bad:
            raise ValueError(f"has {', '.join(bad)} (sizes are at least 1, the offset at least 0)")
        if value["size"] % (value["tp"] * value["cp"] * value["pp"]):
            raise ValueError(f"size {value['size']} is not a multiple of tp x cp x pp")
        return value
    saved: bool
    """False for a frozen node left out of the save (it is reloaded from its ``init`` source)."""
    optimizer: Any = None
    """The optimizer's non-tensor state (Adam's step, parameter groups), None without one."""
    scheduler_steps: int | None = None
    """The learning-rate schedule position."""
    bytes: int = 0
    adapters_only: bool = False
    """True for a LoRA node saved without its frozen base (which comes back from ``init`` or the seed)."""
    lora: LoraRecord | None = None
    """The node's adapters (None: no LoRA). Absent from checkpoints written before it was recorded
    (``"lora" not in model_fields_set``): the manifest's graph document tells then."""


class DataPosition(_Record):
    """Where the data stream stands: the next step's batch is a function of these."""

    seed: int
    batch_size: int
    consumed_samples: int
    num_chunks: int | None = None
    """The chunks each batch was read in (a stream's saved states fit only the same cut)."""
    stream_states: bool = False
    """Whether the step folder holds the stream's state per chunk (``data/chunk_C.json``)."""


class Manifest(_Record):
    """The ``mimo.json`` of one step folder: step, world size, graph document, per-node records, data position."""

    format: int = FORMAT
    step: int
    world_size: int
    graph: dict[str, Any]
    nodes: dict[str, NodeRecord]
    data: DataPosition | None = None
    skipped_steps: int = 0
    device: str = "cpu"
    """Where the saving run computed ("cpu" or "cuda"): generator states only fit the same kind."""
    seed: int | None = None
    """The seed the saving run built its weights from: where a node's base weights come from the
    seed (a LoRA node without ``init``), a resumed run needs the same one."""


def layout_record(layout: Layout) -> dict[str, int]:
    """``layout`` as the manifest stores it: offset, size, tp, cp, pp, ep and etp (expert TP)."""
    return {"offset": layout.offset, "size": layout.size, "tp": layout.tp, "cp": layout.cp,
            "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp}


def step_name(step: int) -> str:
    """The folder name of ``step``, e.g. ``step_0000006``."""
    return f"step_{step:07d}"


def step_of(folder: Path) -> int:
    """The step a step folder holds (the inverse of :func:`step_name`)."""
    return int(folder.name.removeprefix("step_"))


def partial_dir(root: Path, step: int) -> Path:
    """The staging folder ``step`` is written into before commit: ``root/.step_NNNNNNN.partial``."""
    return root / f".{step_name(step)}.partial"


def resolve(path: str | os.PathLike) -> Path:
    """The step folder ``path`` names: itself, or the one its ``latest`` points to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: it is a file; name the checkpoint folder (or a step "
                              "folder inside it)")
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        raise CheckpointError(f"{latest} points to {target.name}, which holds no {MANIFEST}")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    raise CheckpointError(f"no checkpoint at {path}: neither {MANIFEST} nor {LATEST} is there "
                          f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})")


def named_step(path: str | os.PathLike) -> Path | None:
    """The step folder ``path`` names whether or not it is whole (its manifest may be missing):
    ``path`` itself when it holds a manifest or is named ``step_*``, else the folder its ``latest``
    points to; None when it names none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path if path.name.startswith("step_") and path.is_dir() else None


def is_project_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a manifest or a ``latest`` pointer (a step folder or a checkpoint root)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / LATEST).is_file()


def read_manifest(step_dir: Path) -> Manifest:
    """The parsed manifest of ``step_dir``; a :class:`CheckpointError` when unreadable or invalid."""
    try:
        return Manifest.model_validate(json.loads((step_dir / MANIFEST).read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as err:
        raise CheckpointError(f"{step_dir / MANIFEST} is not a readable manifest: {err}") from None


def prepare(root: Path, step: int) -> Path:
    """Remove leftovers of interrupted saves and create this step's partial folder (rank 0)."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step_*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    target = partial_dir(root, step)
    target.mkdir()
    return target


def commit(root: Path, step: int, manifest: Manifest) -> Path:
    """Write the manifest, publish the step folder, then point ``latest`` at it (rank 0)."""
    staging, final = partial_dir(root, step), root / step_name(step)
    _write_durably(staging / MANIFEST, manifest.model_dump_json(indent=2))
    if final.exists():  # the same step saved again: the new one replaces it
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_durably(root / f".{LATEST}.tmp", final.name)
    os.replace(root / f".{LATEST}.tmp", root / LATEST)
    _sync_dir(root)
    return final


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_stream_states(folder: Path, states: dict[int, dict]) -> None:
    """Each chunk's data-stream state as ``folder/data/chunk_C.json`` (JSON values only)."""
    if states:
        (folder / DATA).mkdir(exist_ok=True)
    for chunk, state in states.items():
        _write_durably(folder / DATA / f"chunk_{chunk}.json", json.dumps(state))


def read_stream_states(step_dir: Path, chunks: list[int]) -> dict[int, dict]:
    """The saved data-stream states of ``chunks``; a missing one is a CheckpointError."""
    states = {}
    for chunk in chunks:
        path = step_dir / DATA / f"chunk_{chunk}.json"
        try:
            states[chunk] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: the data stream's state of chunk {chunk} cannot be read ({err}); "
                                  "the checkpoint is damaged") from None
    return states


def folder_bytes(path: Path) -> int:
    """Total size in bytes of the files under ``path``, recursively."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def step_folders(root: Path) -> list[Path]:
    """Complete step folders under ``root``, oldest first."""
    return sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
