"""One optimizer step for a whole graph, on Megatron-Core's optimizers.

Per trainable node on its own ranks: MCore's ``get_megatron_optimizer`` over the node's chunks
and ProcessGroupCollection (fp32 master weights for bf16 models; the distributed optimizer,
sharding state over the node's DP group, when the node's DDP options say
``use_distributed_optimizer``) and MCore's ``OptimizerParamScheduler`` (warm-up + decay).

Graph-wide, :meth:`GraphOptimizer.step` does what MCore's ``optimizer.step()`` does for one
model, across nodes: MCore's ``finalize_model_grads`` (DDP sync, tied embeddings across
pipeline stages), gradients into the main params, one L2 norm over every
parameter of the graph (MCore's per-node norm over the node's grad-stats group, then one sum over
nodes, each node counted once), the non-finite guard, one clip coefficient, then each node's
update. Every rank walks the nodes in the graph's one order, so the collectives cannot deadlock.
Frozen nodes have no gradients and no optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mimo_builder._internal.platform import compat
from mimo_builder._internal.errors import ConfigError, MimoError
from mimo_builder._internal.document.optimizer import OptimizerSettings
from mimo_builder._internal.runtime.timing import NoTimer, PhaseTimer
from mimo_builder._internal.assembly.walker import CompositeModel


class NonFiniteError(MimoError, FloatingPointError):
    """A non-finite loss or gradient with ``on_nonfinite: error``; raised on every rank."""


class OptimizerStepError(MimoError, RuntimeError):
    """The optimizer step raised on some rank; the message names the root cause's rank and node."""


@dataclass(frozen=True)
class StepResult:
    """What one graph-wide step did (the same on every rank)."""

    grad_norm: float
    """L2 norm of every gradient of the graph, before clipping."""

    skipped: bool
    """True when a non-finite loss or gradient skipped the update."""

    nonfinite_nodes: tuple[str, ...] = ()
    """Nodes whose gradients were non-finite."""


@dataclass
class _NodeOptimizer:
    """One node's MCore optimizer and learning-rate scheduler on this rank."""

    name: str
    chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler

    def parts(self) -> list:
        """The optimizers MCore chained for this node (dense, expert)."""
        if isinstance(self.optimizer, ChainedOptimizer):
            return list(self.optimizer.chained_optimizers)
        return [self.optimizer]


class GraphOptimizer:
    """MCore optimizers over each hosted, trainable node, with one graph-wide grad norm.

    ``settings`` defaults to the graph document's ``optimizer:`` (per-node overrides applied);
    ``total_steps`` is the run's length, the decay length when the settings give none.
    ``timer`` receives each node's gradient reduction (communication) and update (optimizer).
    """

    def __init__(self, model: CompositeModel, settings: OptimizerSettings | None = None, *,
                 total_steps: int | None = None, timer: PhaseTimer | None = None):
        self.model = model
        self.timer = timer or NoTimer()
        self.settings = settings if settings is not None else model.valid.graph.optimizer
        self.device = _model_device(model)
        self.control = model.control
        self.skipped_steps = 0
        self.nodes: dict[str, _NodeOptimizer] = {}
        with self._mcore_scope():
            for name in model.valid.order:  # one global order: node collectives cannot deadlock
                if model.hosts(name) and _trainable(model, name):
                    self.nodes[name] = self._build_node(name, total_steps)

    def _build_node(self, name: str, total_steps: int | None) -> _NodeOptimizer:
        settings = self.settings.for_node(self.model.valid.graph.nodes[name].optimizer)
        chunks = self.model.chunks(name)
        config = _mcore_config(name, settings, chunks)
        pgs = self.model.pg_collection(name)
        with compat.gather_objects_within(pgs.intra_dist_opt):
            optimizer = get_megatron_optimizer(config, chunks, pg_collection=pgs, use_gloo_process_groups=False)
        return _NodeOptimizer(name, chunks, optimizer, _scheduler(name, optimizer, settings, total_steps))

    def _mcore_scope(self):
        return compat.cuda_factories_on_cpu(self.device)

    # --- the step -----------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Clear DDP's gradient buffers and the main params' gradients."""
        for node in self.nodes.values():
            for chunk in node.chunks:
                chunk.zero_grad_buffer()
            node.optimizer.zero_grad()

    def step(self, loss: float | None = None) -> StepResult:
        """Sync, norm, guard, clip and update every node. ``loss`` (the step's global loss, the
        same on every rank) is checked too when given. Skipped steps do not advance the schedule.
        A failure here is published to every rank (see :mod:`~mimo_builder._internal.runtime.guard`)."""
        guard, failure, cause = self.model.guard, None, None
        with guard.watch("optimizer"), self._mcore_scope():
            try:
                result = self._step(loss)
            except MimoError:
                raise
            except Exception as err:
                failure = guard.publish_error(guard.detail, err)
                cause = err.with_traceback(None)
            # every rank learns of a failure (a rank that failed before the norm's collective
            # leaves its peers blocked there: their watchdogs end them)
            failure = guard.agree(failure)
        if failure is not None:
            raise OptimizerStepError(failure) from cause
        return result

    def _step(self, loss: float | None) -> StepResult:
        guard = self.model.guard
        for name, node in self.nodes.items():  # graph order: overlapping node groups stay in step
            guard.note(f"optimizer of node '{name}' (gradient sync)")
            with self.timer.measure(name, "communication"):
                # DP reduction, plus tied embeddings across pipeline stages (MCore's own finalizer)
                finalize_model_grads(node.chunks, pg_collection=self.model.pg_collection(name))
            with self.timer.measure(name, "optimizer"):
                node.optimizer.prepare_grads()
        guard.note("optimizer (graph-wide gradient norm)")
        node_norms = self._node_norms()
        norm = math.sqrt(sum(n * n for n in node_norms.values()))
        bad = tuple(name for name, n in node_norms.items() if not math.isfinite(n))
        if bad or not math.isfinite(norm) or (loss is not None and not math.isfinite(loss)):
            return self._skip(norm, bad, loss)
        if self.settings.clip_grad > 0:
            for node in self.nodes.values():
                for part in node.parts():
                    clip_grad_by_total_norm_fp32(part.get_parameters(), self.settings.clip_grad, norm)
        for name, node in self.nodes.items():
            guard.note(f"optimizer of node '{name}' (update)")
            with self.timer.measure(name, "optimizer"):
                node.optimizer.step_with_ready_grads()
                node.scheduler.step(increment=1)
        return StepResult(norm, False)

    def _node_norms(self) -> dict[str, float]:
        """Every trainable node's gradient L2 norm, on every rank (each shard counted once)."""
        trainable = [n for n in self.model.valid.order if _trainable_anywhere(self.model, n)]
        squares = torch.zeros(len(trainable), dtype=torch.float64)
        rank = dist.get_rank()
        for i, name in enumerate(trainable):
            if name in self.nodes:
                with self.timer.measure(name, "optimizer"):
                    node_norm = _node_norm(self.nodes[name])  # collective over the node's groups
                if rank == self.model.valid.layouts[name].offset:  # one contribution per node
                    squares[i] = node_norm ** 2
        dist.all_reduce(squares, group=self.control)
        return {name: math.sqrt(float(s)) if math.isfinite(s) else float(s) for name, s in zip(trainable, squares)}

    def _skip(self, norm: float, bad: tuple[str, ...], loss: float | None) -> StepResult:
        self.skipped_steps += 1
        what = f"non-finite gradients in node(s) {', '.join(bad)}" if bad else f"non-finite loss {loss}"
        if self.settings.on_nonfinite == "error":
            raise NonFiniteError(f"{what} (grad norm {norm}); the update was not applied "
                                 "(set optimizer.on_nonfinite: skip to skip such steps instead)")
        return StepResult(norm, True, bad)

    # --- introspection ------------------------------------------------------------------------

    def learning_rates(self) -> dict[str, float]:
        """Each hosted node's current learning rate (its first parameter group's)."""
        return {name: float(node.optimizer.param_groups[0]["lr"]) for name, node in self.nodes.items()}

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds per node for optimizer state: moments plus fp32 master copies
        (parameters the optimizer updates that are not the model's own storage)."""
        out = {}
        for name, node in self.nodes.items():
            model_storage = {p.untyped_storage().data_ptr() for c in node.chunks for p in c.parameters()}
            total = 0
            for part in node.parts():
                for state in part.optimizer.state.values():
                    total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
                for p in part.get_parameters():
                    if p.untyped_storage().data_ptr() not in model_storage:
                        total += p.numel() * p.element_size()
            out[name] = total
        return out

    def main_params(self, name: str) -> list[torch.Tensor]:
        """The parameters ``name``'s optimizer updates on this rank (fp32 masters under bf16)."""
        return [p for part in self.nodes[name].parts() for p in part.get_parameters()]


def _node_norm(node: _NodeOptimizer) -> float:
    """MCore's gradient norm of one node, over each part's grad-stats group."""
    total = 0.0
    for part in node.parts():
        value = get_grad_norm_fp32(part.get_grads_for_grad_norm(),
                                   grad_stats_parallel_group=part.get_grad_stats_parallel_group())
        total += float(value) ** 2
    return math.sqrt(total)


def _mcore_config(name: str, settings: OptimizerSettings, chunks) -> OptimizerConfig:
    model_config = chunks[0].config
    if model_config.fp16:
        raise ConfigError(f"node '{name}': dtype fp16 needs loss scaling, which the graph optimizer does "
                          "not apply; train with dtype bf16 (or fp32), or freeze the node")
    ddp = getattr(chunks[0], "ddp_config", None)
    distributed = bool(ddp and ddp.use_distributed_optimizer)
    if distributed and settings.optimizer != "adam":
        raise ConfigError(f"node '{name}': the distributed optimizer (ddp.use_distributed_optimizer) "
                          f"supports optimizer 'adam' only, not {settings.optimizer!r}")
    return OptimizerConfig(
        optimizer=settings.optimizer, lr=settings.lr, min_lr=settings.min_lr,
        weight_decay=settings.weight_decay, clip_grad=settings.clip_grad,
        bf16=model_config.bf16, params_dtype=model_config.params_dtype,
        use_distributed_optimizer=distributed, **settings.mcore)


def schedule_problems(name: str, settings: OptimizerSettings, total_steps: int | None) -> list[str]:
    """Why node ``name``'s learning-rate schedule cannot run ``total_steps`` steps (pure: the CLI
    asks before any rank starts)."""
    decay = settings.decay_steps or total_steps
    if decay is None:
        if settings.decay_style != "constant" or settings.warmup_steps:
            return [f"node '{name}': decay_style {settings.decay_style!r} with warmup_steps "
                    f"{settings.warmup_steps} needs optimizer.decay_steps (or the run's length)"]
    elif decay <= settings.warmup_steps:
        return [f"node '{name}': the run's {decay} steps must exceed optimizer.warmup_steps "
                f"({settings.warmup_steps}); set decay_steps or train longer"]
    return []


def _scheduler(name: str, optimizer, settings: OptimizerSettings, total_steps: int | None):
    problems = schedule_problems(name, settings, total_steps)
    if problems:
        raise ConfigError(problems[0])
    decay = settings.decay_steps or total_steps or 1
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps, lr_decay_steps=decay, lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=decay,
        wd_incr_style="constant")


def _trainable(model: CompositeModel, name: str) -> bool:
    return any(p.requires_grad for chunk in model.chunks(name) for p in chunk.parameters())


def _trainable_anywhere(model: CompositeModel, name: str) -> bool:
    """Whether ``name`` has an optimizer on its ranks (known on every rank, from the document)."""
    return not model.valid.graph.nodes[name].frozen


def _model_device(model: CompositeModel) -> torch.device:
    for name in model.valid.order:
        if model.hosts(name):
            for p in model.chunks(name)[0].parameters():
                return p.device
    return compat.resolve_device("auto")


def check_runnable(valid) -> None:
    """Raise ConfigError for graphs the graph optimizer cannot train (before anything is built)."""
    for name in valid.order:
        if getattr(valid.configs[name], "dtype", None) == "fp16" and not valid.graph.nodes[name].frozen:
            raise ConfigError(f"node '{name}' config.dtype: fp16 training needs loss scaling, which the graph "
                              "optimizer does not apply; use bf16 (fp32 master weights) or freeze the node")
