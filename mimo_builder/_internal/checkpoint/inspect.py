"""``mimo-builder ckpt inspect DIR``: what a checkpoint folder holds, read from its manifests and
tensor metadata (no tensor is read); a missing or truncated shard is a CheckpointError."""

from __future__ import annotations

from pathlib import Path

from mimo_builder._internal.checkpoint import files
from mimo_builder._internal.checkpoint.checks import intact_hint, shard_problems
from mimo_builder._internal.checkpoint.safe_load import safe_unpickling


def describe(path: str, as_json: bool = False) -> str:
    """Steps under ``path`` (a root or a step folder) and the latest one's nodes, placements
    and sizes; with ``as_json``, that step's manifest."""
    step_dir = files.resolve(path)
    manifest = files.read_manifest(step_dir)
    if as_json:
        return manifest.model_dump_json(indent=2)
    root = Path(path) if step_dir != Path(path) else step_dir.parent
    steps = [p.name for p in files.step_folders(root)]
    lines = [f"{step_dir}: step {manifest.step}, saved by {manifest.world_size} ranks, "
             f"{_size(files.folder_bytes(step_dir))} on disk"]
    if len(steps) > 1:
        lines.append(f"steps in {root}: {', '.join(steps)}")
    leftovers = sorted(p.name for p in root.glob(".step_*.partial"))
    if leftovers:
        lines.append(f"interrupted saves (ignored, removed by the next save): {', '.join(leftovers)}")
    if manifest.data:
        d = manifest.data
        lines.append(f"data: seed {d.seed}, batch size {d.batch_size}, {d.consumed_samples} samples consumed")
    if manifest.skipped_steps:
        lines.append(f"skipped steps so far: {manifest.skipped_steps}")
    lines.append("")
    lines.append(f"{'node':<12} {'builder':<10} {'ranks':<8} {'tp':>3} {'pp':>3} {'dp':>3} {'ep':>3}  "
                 f"{'state':<22} {'schedule':>8} {'bytes':>10}")
    for name, record in manifest.nodes.items():
        lines.append(_node_line(name, record))
    with safe_unpickling():
        damaged = shard_problems(step_dir)
    if damaged:
        raise files.CheckpointError("\n".join(lines) + f"\n\n{step_dir} is damaged:\n" +
                                    "\n".join(f"  - {p}" for p in [*damaged, intact_hint(step_dir)]))
    lines.append("\nshards: every file the tensor metadata lists is present and complete")
    return "\n".join(lines)


def _node_line(name: str, record: files.NodeRecord) -> str:
    p = record.placement
    dp = p["size"] // (p["tp"] * p["cp"] * p["pp"])
    ranks = f"{p['offset']}-{p['offset'] + p['size'] - 1}"
    model = "adapters" if record.adapters_only else "model"
    held = (f"{model} + optimizer" if record.optimizer is not None else model) if record.saved else "not saved (frozen)"
    schedule = "-" if record.scheduler_steps is None else str(record.scheduler_steps)
    return (f"{name:<12} {record.builder:<10} {ranks:<8} {p['tp']:>3} {p['pp']:>3} {dp:>3} {p['ep']:>3}  "
            f"{held:<22} {schedule:>8} {_size(record.bytes):>10}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
