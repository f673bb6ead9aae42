"""Save and resume a graph's whole training state with Megatron-Core's dist_checkpointing.

Every rank calls :meth:`Checkpointer.save` / :meth:`Checkpointer.load` together. A save writes
one torch_dist checkpoint for the whole graph: each rank contributes the sharded state of the
nodes it hosts (model, optimizer; keys named under the node), plus its generator states; the
manifest carries the rest (see :mod:`mimo_builder._internal.checkpoint.files`). Because MCore's keys are
global, a checkpoint loads under any other placement of the same graph: weights, fp32 masters
and Adam moments are resharded; generator states are restored only on the same placement.
A load first checks the checkpoint against the graph and names every difference on every
rank, before any weight is touched.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from mimo_builder._internal.platform import compat
from mimo_builder._internal.checkpoint import files, state
from mimo_builder._internal.checkpoint.background import BackgroundSaves
from mimo_builder._internal.checkpoint.checks import intact_hint, raise_if_any, shape_problems, shard_problems
from mimo_builder._internal.checkpoint.files import DataPosition, Manifest, NodeRecord
from mimo_builder._internal.checkpoint.lora_fit import lora_problems, lora_record
from mimo_builder._internal.checkpoint.safe_load import safe_unpickling
from mimo_builder._internal.assembly.lora import is_adapter_key


@dataclass(frozen=True)
class Resumed:
    """What a load restored (the same on every rank)."""

    step: int
    data: DataPosition | None
    folder: Path | None = None
    """The step folder loaded (where the data stream's states are)."""
    resharded: tuple[str, ...] = ()
    """Nodes whose placement differs from the checkpoint's (their state was resharded)."""
    reset: tuple[str, ...] = ()
    """State the checkpoint could not give back, each with the reason."""


class Checkpointer:
    """Saves and loads the training state of ``model`` (and ``optimizer``, a GraphOptimizer).

    Frozen nodes are not saved unless ``save_frozen``: they come back from their ``init`` source.
    """

    def __init__(self, model, optimizer=None, *, save_frozen: bool = False, timeout_s: float | None = None):
        self.model = model
        self.timeout_s = timeout_s  # how long a save or load may take (None: no limit)
        self.optimizer = optimizer
        self.save_frozen = save_frozen
        self.valid = model.valid
        self.control = model.control
        self.background = BackgroundSaves()
        self.published: list[Path] = []  # background steps published while a new save started
        self._writing: tuple[Path, int] | None = None  # the background save's root and step
        self._strategy = None  # MCore's save strategy, made at the first save

    # --- save -----------------------------------------------------------------------------------

    def save(self, root: str | Path, step: int, data: DataPosition | None = None,
             stream_states: dict[int, dict] | None = None, background: bool = False) -> Path | None:
        """Write step ``step`` under ``root``; returns the step folder (on every rank).
        ``stream_states``: this rank's share of the data stream's state per chunk (RankLoader.states).
        ``background``: start the write in the background and return None at once; a later
        :meth:`finish_background` publishes the step (a save still being written is finished
        first, waiting)."""
        with self._guarded("checkpoint save"):
            earlier = self.background.finish(wait=True) if self.background.busy else []
            self.published.extend(earlier)
            return self._save(Path(root), step, data, stream_states or {}, background)

    def finish_background(self, wait: bool = False) -> list[Path]:
        """The step folders of background saves published since the last call (every rank calls
        it at the same point; ``wait``: until every save is)."""
        done = []
        if self.background.busy:
            with self._guarded("checkpoint save"):
                try:
                    done = self.background.finish(wait)
                except (Exception, CheckpointException) as err:  # a writer failed on some rank
                    raise _save_error(err, *self._writing, 0) from err
        published, self.published = [*self.published, *done], []
        return published

    @contextlib.contextmanager
    def writing(self):
        """A block whose failure stops the background writers, their steps unpublished."""
        try:
            yield self
        except BaseException:
            self.background.abort()
            raise

    @contextlib.contextmanager
    def _guarded(self, what: str):
        """A failure or a stall here reaches every rank (the model's watchdog)."""
        guard = self.model.guard
        with guard.watch("checkpoint", timeout_s=self.timeout_s or math.inf), guard.publishing(what):
            yield

    def _save(self, root: Path, step: int, data: DataPosition | None, stream_states: dict[int, dict],
              background: bool = False) -> Path | None:
        rank = dist.get_rank()
        raise_if_any(self.control, self._overwrite_problems(root) if rank == 0 else [])
        if rank == 0:
            files.prepare(root, step)
        dist.barrier(group=self.control)
        files.write_stream_states(files.partial_dir(root, step), stream_states)
        tree = self._tree(loading=False, nodes=self._saved_nodes(), adapters_only=self._adapters_only())
        tree["rng"] = state.rng_state(rank, dist.get_world_size())
        records = self._records(tree)
        manifest = Manifest(step=step, world_size=dist.get_world_size(), graph=self.valid.graph.as_dict(),
                            nodes=records, data=data, skipped_steps=getattr(self.optimizer, "skipped_steps", 0),
                            seed=self.model.seed, device=state.device_kind())
        with self._scope():
            try:
                request = dist_checkpointing.save(state.sharded_leaves(tree), str(files.partial_dir(root, step)),
                                                  sharded_strategy=self._save_strategy(),
                                                  async_sharded_save=background, async_strategy="mcore")
            except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
                raise _save_error(err, root, step, state.tensor_bytes(tree)) from err
        if background:
            self._writing = (root, step)
            self.background.start(request, lambda: self._commit(root, step, manifest))
            return None
        return self._commit(root, step, manifest)

    def _save_strategy(self):
        """MCore's torch_dist saving, each replicated shard written by one of its holders chosen
        to balance the bytes per rank (MCore's fully parallel save over the graph's ranks). The
        distribution and the global save plan are computed at the first save and reused: every
        save of a run holds the same shards (MCore checks the local plans still match)."""
        if self._strategy is None:
            from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
            from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

            base = TorchDistSaveShardedStrategy(cached_metadata=True)  # plans gathered once, reused while they hold
            self._strategy = FullyParallelSaveStrategyWrapper(base, self.control, do_cache_distribution=True)
        return self._strategy

    def _commit(self, root: Path, step: int, manifest: Manifest) -> Path:
        """Publish the written step (rank 0: manifest, rename, ``latest``); on every rank."""
        if dist.get_rank() == 0:
            files.commit(root, step, manifest)
        dist.barrier(group=self.control)
        return root / files.step_name(step)

    def _adapters_only(self) -> set[str]:
        """LoRA nodes whose frozen base is left out of a save (unless ``save_frozen``)."""
        graph = self.valid.graph
        return set() if self.save_frozen else {n for n in self.valid.order if graph.nodes[n].lora is not None}

    def _saved_nodes(self) -> list[str]:
        graph = self.valid.graph
        return [n for n in self.valid.order if self.save_frozen or not graph.nodes[n].frozen]

    def _overwrite_problems(self, root: Path) -> list[str]:
        if not (root / files.LATEST).is_file():
            return []
        previous = files.read_manifest(files.resolve(root))
        ours = {n: node.builder for n, node in self.valid.graph.nodes.items()}
        theirs = {n: node["builder"] for n, node in previous.graph.get("nodes", {}).items()}
        if ours == theirs:
            return []
        return [f"{root} holds checkpoints of another graph (nodes {_kinds(theirs)}; this graph has "
                f"{_kinds(ours)}); save elsewhere or remove it"]

    def _records(self, tree: dict) -> dict[str, NodeRecord]:
        """Each saved node's manifest record, gathered from its ranks (its first rank's scalars)."""
        rank, mine = dist.get_rank(), {}
        for name in tree.keys() - {"rng"}:
            first = rank == self.valid.layouts[name].offset
            node_optimizer = self.optimizer.nodes.get(name) if self.optimizer else None
            mine[name] = {"bytes": state.tensor_bytes(tree[name]), "first": first,
                          "optimizer": state.plain_part(tree[name]["optimizer"]) if first and node_optimizer else None,
                          "scheduler_steps": node_optimizer.scheduler.num_steps if first and node_optimizer else None}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine, group=self.control)
        records = {}
        for name in self._saved_nodes():
            parts = [g[name] for g in gathered if name in g]
            first = next(p for p in parts if p["first"])
            records[name] = NodeRecord(
                builder=self.valid.graph.nodes[name].builder,
                placement=files.layout_record(self.valid.layouts[name]), saved=True,
                optimizer=first["optimizer"], scheduler_steps=first["scheduler_steps"],
                bytes=sum(p["bytes"] for p in parts), adapters_only=name in self._adapters_only(),
                lora=lora_record(self.valid.graph.nodes[name].lora, self.valid.builders[name]))
        for name in set(self.valid.order) - records.keys():
            records[name] = NodeRecord(builder=self.valid.graph.nodes[name].builder,
                                       placement=files.layout_record(self.valid.layouts[name]), saved=False)
        return records

    # --- load -----------------------------------------------------------------------------------

    def load(self, path: str | Path, *, with_optimizer: bool = True) -> Resumed:
        """Restore the state saved at ``path`` (a step folder, or a root with ``latest``)."""
        with self._guarded("checkpoint load"):
            return self._load(path, with_optimizer)

    def _load(self, path: str | Path, with_optimizer: bool) -> Resumed:
        step_dir = files.resolve(path)
        manifest = files.read_manifest(step_dir)
        raise_if_any(self.control, graph_problems(self.valid, manifest, step_dir, self.model.seed))
        nodes = [n for n in self.valid.order if n in manifest.nodes and manifest.nodes[n].saved]
        resharded = tuple(n for n in nodes if manifest.nodes[n].placement
                          != files.layout_record(self.valid.layouts[n]))
        same_placement = not resharded and manifest.world_size == dist.get_world_size()
        same_device = manifest.device == state.device_kind()
        with_optimizer = with_optimizer and self.optimizer is not None
        optimized = [n for n in nodes if with_optimizer and manifest.nodes[n].optimizer is not None]
        adapters_only = {n for n in nodes if manifest.nodes[n].adapters_only}
        tree = self._tree(loading=True, nodes=nodes, optimized=optimized, adapters_only=adapters_only)
        if same_placement and same_device:
            tree["rng"] = state.rng_state(dist.get_rank(), dist.get_world_size())
        flat = state.sharded_leaves(tree)
        with safe_unpickling():
            damaged = shard_problems(step_dir) if dist.get_rank() == 0 else []
            damaged += [intact_hint(step_dir)] if damaged else []
            raise_if_any(self.control, damaged, title=f"checkpoint {step_dir} is damaged; load an earlier step")
            raise_if_any(self.control, shape_problems(flat, step_dir, self._describer(manifest)))
            with self._scope():
                loaded = dist_checkpointing.load(flat, str(step_dir))
        state.fill(tree, loaded)
        self._restore(tree, manifest)
        reset = self._reset_notes(nodes, optimized, with_optimizer, _rng_note(manifest, same_placement, same_device))
        return Resumed(manifest.step, manifest.data, step_dir, resharded, tuple(reset))

    def _restore(self, tree: dict, manifest: Manifest) -> None:
        for name, node in tree.items():
            if name == "rng":
                state.restore_rng(node)
                continue
            state.load_model(self.model.chunks(name), node["model"], partial=manifest.nodes[name].adapters_only)
            if "optimizer" in node:
                record = manifest.nodes[name]
                opt = self.optimizer.nodes[name]
                with self._scope():
                    opt.optimizer.load_state_dict(state.overlay(node["optimizer"], record.optimizer))
                opt.scheduler.num_steps = 0
                opt.scheduler.step(increment=record.scheduler_steps or 0)
        if any("optimizer" in node for node in tree.values()):
            self.optimizer.skipped_steps = manifest.skipped_steps

    def _reset_notes(self, nodes, optimized, with_optimizer, rng_note: str | None) -> list[str]:
        notes = [rng_note] if rng_note else []
        for name in self.valid.order:
            if name not in nodes:
                notes.append(f"node '{name}' (not saved in the checkpoint; kept as built)")
            elif with_optimizer and name not in optimized and not self.valid.graph.nodes[name].frozen:
                notes.append(f"optimizer of node '{name}' (the checkpoint has none; moments start at zero)")
        return notes

    def _describer(self, manifest: Manifest):
        def describe(key: str) -> tuple[str, str]:
            node = key.removeprefix("optimizer.state.").split(".", 1)[-1] if key.startswith("optimizer.") else key
            node = node.split(".")[0]
            return node, _config_diff(manifest, self.valid, node)
        return describe

    # --- shared ---------------------------------------------------------------------------------

    def _tree(self, *, loading: bool, nodes: list[str], optimized: list[str] | None = None,
              adapters_only: set[str] = frozenset()) -> dict:
        tree = {}
        for name in nodes:
            if not self.model.hosts(name):
                continue
            pgs = self.model.pg_collection(name)
            keep = is_adapter_key if name in adapters_only else None
            model_sd = state.model_state(self.model.chunks(name), pgs, f"{name}.", keep)
            tree[name] = {"model": model_sd}
            node_optimizer = self.optimizer.nodes.get(name) if self.optimizer else None
            if node_optimizer and (optimized is None or name in optimized):
                with self._scope():
                    tree[name]["optimizer"] = state.optimizer_state(node_optimizer.optimizer, model_sd, pgs, loading)
        return tree

    def _scope(self):
        device = self.optimizer.device if self.optimizer else compat.resolve_device("auto")
        return compat.cuda_factories_on_cpu(device) if device.type == "cpu" else contextlib.nullcontext()


def graph_problems(valid, manifest: Manifest, step_dir: Path, seed: int | None = None) -> list[str]:
    """Differences that make the checkpoint unusable for ``valid``'s graph built from ``seed``
    (pure: the same on every rank, so it can run before any rank starts)."""
    if manifest.format != files.FORMAT:
        return [f"{step_dir}: checkpoint format {manifest.format}, this build reads {files.FORMAT}"]
    problems = []
    for name, node in valid.graph.nodes.items():
        problems += _node_problems(valid, manifest, name, node, seed)
    return problems


def _node_problems(valid, manifest: Manifest, name: str, node, seed: int | None) -> list[str]:
    record = manifest.nodes.get(name)
    if record is None:
        if node.frozen or node.init:
            return []
        return [f"node '{name}' ({node.builder}) is not in the checkpoint (it has "
                f"{_kinds({n: r.builder for n, r in manifest.nodes.items()})}); give it an init: source or freeze it"]
    if record.builder != node.builder:
        return [f"node '{name}': the checkpoint holds a '{record.builder}' node, the graph declares '{node.builder}'"]
    if record.adapters_only and node.lora is None:  # named with the adapters' settings where they are known
        return lora_problems(manifest, name, node, valid.builders[name]) or [
            f"node '{name}': the checkpoint holds its LoRA adapters only; declare the same lora: for the node "
            "(the base comes from its init: source or the seed)"]
    problems = lora_problems(manifest, name, node, valid.builders[name])
    if record.adapters_only and node.init is None and None not in (seed, manifest.seed) and seed != manifest.seed:
        problems.append(f"node '{name}': its base weights come from the seed, and the checkpoint's adapters "
                        f"were trained on the base of seed {manifest.seed}, not {seed}; build with seed "
                        f"{manifest.seed} (run --seed {manifest.seed})")
    return problems


def check_resumable(valid, path, seed: int | None = None, resume: bool = False) -> Path:
    """The step folder ``path`` names, after checking (before any rank starts) that its manifest
    reads, fits ``valid``'s graph built from ``seed`` and every shard is there; CheckpointError otherwise.
    Where the step is damaged, the error names the last intact step beside it and the ``--load`` that
    starts from it (``resume``: the check is ``--resume``'s)."""
    try:
        step_dir = files.resolve(path)
        manifest = files.read_manifest(step_dir)
    except files.CheckpointError as err:  # a step without a readable manifest is damaged
        step = files.named_step(path)
        raise (files.CheckpointError(f"{err}\n{_damaged(step, resume)}") if step else err) from None
    problems = graph_problems(valid, manifest, step_dir, seed)
    with safe_unpickling():
        damaged = shard_problems(step_dir)
    if problems or damaged:
        hint = f"\n{_damaged(step_dir, resume)}" if damaged else ""
        raise files.CheckpointError(f"--load {path}: cannot resume from {step_dir}:\n" +
                                    "\n".join(f"  - {p}" for p in problems + damaged) + hint)
    return step_dir


def _damaged(step_dir: Path, resume: bool) -> str:
    return f"{step_dir} is damaged; {intact_hint(step_dir, resume)}"


def _save_error(err: BaseException, root: Path, step: int, needed: int) -> Exception:
    """The save's failure as a CheckpointError: a full disk named as such (MCore's async writer
    reports only the error's class), torch's writer failures summarised; other errors as they are."""
    free = shutil.disk_usage(root).free
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err) or free < needed
    if full:
        return files.CheckpointError(f"saving step {step} under {root}: no space left on its device ({free:,} bytes "
                                     f"free; this rank writes {needed:,}); the last complete step stays loadable")
    if isinstance(err, CheckpointException):
        failures = {r: e if isinstance(e, BaseException) else e[0] for r, e in err.failures.items()}  # (exc, trace)
        causes = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
        return files.CheckpointError(f"saving step {step} under {root} failed ({causes}); the last complete step "
                                     "stays loadable")
    return err


def _rng_note(manifest: Manifest, same_placement: bool, same_device: bool) -> str | None:
    """Why the generator states were not restored, if they were not."""
    if not same_placement:
        return "generator states (the placement differs; seeded afresh)"
    if not same_device:
        return f"generator states (saved on {manifest.device}, running on {state.device_kind()}; seeded afresh)"
    return None


def _kinds(builders: dict[str, str]) -> str:
    return ", ".join(f"{n} ({b})" for n, b in builders.items()) or "no nodes"


def _config_diff(manifest: Manifest, valid, node: str) -> str:
    theirs = manifest.graph.get("nodes", {}).get(node, {}).get("config", {})
    ours = valid.graph.nodes[node].config if node in valid.graph.nodes else {}
    diff = [f"{k}: {theirs.get(k)} (checkpoint) vs {ours.get(k)} (here)"
            for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    return f" (config differs: {'; '.join(diff)})" if diff else ""
