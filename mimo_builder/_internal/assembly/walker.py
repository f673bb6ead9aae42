"""The graph walker: build and wrap each node on its own ranks, as one ModelBuilder.

:class:`CompositeBuilder` validates the document, creates every layout's process groups (all
ranks, one order), then walks the nodes in topological order. A rank builds only the nodes
whose range holds it, each through the node's own builder with its own ProcessGroupCollection
and DDP config; other nodes cost it nothing. After each node all ranks agree on success, so an
error on one rank becomes a :class:`BuildError` on every rank instead of a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import MegatronModule
from megatron.core.transformer.module import Float16Module
from megatron.training.models import base as mcore_base
from megatron.training.models.base import compose_hooks

from mimo_builder._internal.kinds.builder import Port, Ports
from mimo_builder._internal.assembly.lora import add_adapters
from mimo_builder._internal.assembly.seeded_init import seeded_hook
from mimo_builder._internal.checkpoint.pretrained import load_initial_weights
from mimo_builder._internal.platform.compat import seed_rng
from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.document.graph import Graph
from mimo_builder._internal.placement import ProcessGroups, create_process_groups, release
from mimo_builder._internal.kinds.registry import resolve_hook
from mimo_builder._internal.runtime.guard import StepGuard
from mimo_builder._internal.validation import ValidGraph, validate_graph
from mimo_builder._internal.platform import private

_FAILURE_KEY = "mimo_builder/build_failure"


class BuildError(MimoError, RuntimeError):
    """Building the graph failed on some rank; raised on every rank with the root cause."""


class CompositeModel(torch.nn.Module):
    """This rank's built nodes (name -> list of chunks), the plan, and the per-node groups."""

    def __init__(self, valid: ValidGraph, chunks: dict[str, list[MegatronModule]],
                 process_groups: ProcessGroups, guard: StepGuard, control: dist.ProcessGroup, seed: int | None = None):
        super().__init__()
        self.valid = valid
        self.seed = seed
        """The seed the nodes were initialised from (None: not built by the walker)."""
        self.process_groups = process_groups
        self.guard = guard
        self.control = control
        """A gloo group over all ranks for the graph's small control messages (failure flags,
        norms, timings, checkpoint agreement), on CPU tensors whatever the device."""
        self.nodes = torch.nn.ModuleDict({name: torch.nn.ModuleList(c) for name, c in chunks.items()})
        self.initialized_from: dict[str, str] = {}
        """Node -> what its document's ``init:`` loaded into it (e.g. ``24 tensors from hf:DIR
        (NemotronHForCausalLM)``), the same on every rank."""
        self._closers: list[Callable[[], None]] = []

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` when the model closes (the runtime's own groups go with the model)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Release this graph's process groups and stop its watchdog (idempotent; no collective).
        The model cannot run afterwards. Every rank should close its model."""
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
        self.guard.close()
        self.process_groups.destroy()
        release(self.control)
        _clear_method_caches(self)

    def __enter__(self) -> "CompositeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hosts(self, node: str) -> bool:
        """Whether this rank holds (a shard of) ``node``."""
        return node in self.nodes

    def chunks(self, node: str) -> list[MegatronModule]:
        """The model chunks of node ``name`` on this rank (one per virtual stage; empty where it is not hosted)."""
        return list(self.nodes[node])

    def pg_collection(self, node: str) -> ProcessGroupCollection | None:
        """``node``'s groups on this rank (None where the rank is outside the node)."""
        return self.process_groups.for_layout(self.valid.layouts[node])


def _clear_method_caches(model: torch.nn.Module) -> None:
    """Clear the ``functools.lru_cache`` of the model's module methods. MCore caches some
    (``RotaryEmbedding.forward``) per instance, which keeps closed modules, and the groups they
    hold, alive; other live instances of those classes merely recompute."""
    for cls in {type(m) for m in model.modules()}:
        for attr in vars(cls).values():
            if callable(getattr(attr, "cache_clear", None)):
                attr.cache_clear()


class CompositeBuilder(mcore_base.ModelBuilder):
    """The whole graph as one MCore-compatible ModelBuilder.

    ``seed`` seeds every node's initialisation identically, so a node built in a graph equals
    the same node built alone from that seed, and each random weight is drawn whole from its own
    seed (:mod:`mimo_builder._internal.assembly.seeded_init`): the same weights at any placement.
    While building, a collective waits at most ``build_timeout_s`` for its peers (so a rank that
    failed cannot hang the others); afterwards the node groups get ``timeout_s`` (torch's default
    when None). Each step phase may last
    ``step_timeout_s`` (the first step ``first_step_timeout_s``) before the model's watchdog
    names the silent ranks and ends the run (None: no limit); see :mod:`mimo_builder._internal.runtime.guard`.
    """

    def __init__(self, graph: Graph, *, seed: int = 1234,
                 pre_wrap_hooks: list[Callable | str] = (), post_wrap_hooks: list[Callable | str] = (),
                 build_timeout_s: float = 20.0, timeout_s: float | None = None,
                 step_timeout_s: float | None = None, first_step_timeout_s: float | None = None):
        super().__init__(graph)
        self.graph = graph
        self.seed = seed
        self.build_timeout = datetime.timedelta(seconds=build_timeout_s)
        self.timeout = dist.default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.step_timeout_s, self.first_step_timeout_s = step_timeout_s, first_step_timeout_s
        self.pre_wrap_hooks = [resolve_hook(h) for h in (*graph.hooks.pre_wrap, *pre_wrap_hooks)]
        self.post_wrap_hooks = [resolve_hook(h) for h in (*graph.hooks.post_wrap, *post_wrap_hooks)]

    def ports(self) -> Ports:
        """Graph inputs (batch keys) and outputs, with the ports they bind to."""
        valid = validate_graph(self.graph)
        inputs = [_renamed(valid.ports(n).inputs[p], key) for key, (n, p) in valid.inputs.items()]
        outputs = [_renamed(valid.ports(n).outputs[p], f"{n}.{p}") for n, p in valid.outputs]
        return Ports.of(inputs, outputs)

    def build_model(self, pg_collection=None, pre_process=None, post_process=None, vp_stage=None) -> CompositeModel:
        """This rank's nodes, built but not wrapped (no DDP, no mixed-precision wrapper)."""
        (model,) = self.build_distributed_models(pg_collection, wrap_with_ddp=False, mixed_precision_wrapper=None)
        return model

    def build_distributed_models(
        self,
        pg_collection: ProcessGroupCollection | None = None,
        ddp_config: DistributedDataParallelConfig | None = None,
        overlap_param_gather_with_optimizer_step: bool = False,
        use_megatron_fsdp: bool = False,
        use_torch_fsdp2: bool = False,
        wrap_with_ddp: bool = True,
        data_parallel_random_init: bool = False,
        mixed_precision_wrapper: Callable[[Any, MegatronModule], MegatronModule] | None = Float16Module,
        model_type: ModelType = ModelType.encoder_or_decoder,
    ) -> list[CompositeModel]:
        """Build and wrap every node on its own ranks; returns ``[CompositeModel]``.

        MCore's signature. ``pg_collection`` is not used: each node's groups come from its
        placement. ``ddp_config`` is the default under each node's ``ddp`` options.
        """
        valid = validate_graph(self.graph, world_size=dist.get_world_size())
        control = dist.new_group(backend="gloo")  # for agreeing on failures, on any device
        failure_key = f"{_FAILURE_KEY}/{control.group_name}"  # a new group: a new name, the same on every rank
        groups = create_process_groups(valid.layouts.values(), timeout=self.build_timeout)
        options = dict(overlap_param_gather_with_optimizer_step=overlap_param_gather_with_optimizer_step,
                       use_megatron_fsdp=use_megatron_fsdp, use_torch_fsdp2=use_torch_fsdp2,
                       data_parallel_random_init=data_parallel_random_init,
                       mixed_precision_wrapper=mixed_precision_wrapper, model_type=model_type)
        chunks = {}
        for name in valid.order:
            pgs = groups.for_layout(valid.layouts[name])
            failure = None
            if pgs is not None:
                try:
                    chunks[name] = self._build_node(valid, name, pgs, ddp_config, wrap_with_ddp, options)
                except Exception as err:  # every failure must reach the other ranks
                    failure, pgs = _without_frames(err), None
                    _publish(name, failure, failure_key)  # first: the peers' errors that follow are consequences
                    chunks.clear()  # the nodes built so far hold groups too; the build fails anyway
                    groups.abort()  # peers blocked in this node's collectives fail fast, once the groups are gone
                    gc.collect()  # what the failed build made (modules holding the groups) goes now
            _agree(control, name, failure, failure_key)
        groups.set_timeout(self.timeout)
        guard = StepGuard(failure_key.removeprefix(_FAILURE_KEY + "/"), step_timeout_s=self.step_timeout_s,
                          first_step_timeout_s=self.first_step_timeout_s)
        model = CompositeModel(valid, chunks, groups, guard, control, self.seed)
        model.initialized_from = load_initial_weights(model)  # nodes whose document names pretrained weights
        return compose_hooks(self.post_wrap_hooks)([model])

    def _build_node(self, valid: ValidGraph, name: str, pgs, ddp_config, wrap_with_ddp, options):
        node = valid.graph.nodes[name]
        config = valid.configs[name]
        seeded = seeded_hook(self.seed, name, valid.builders[name].param_inits(), pgs)  # before any other hook
        pre = [seeded, *config.pre_wrap_hooks, *node.hooks.pre_wrap, *self.pre_wrap_hooks]
        if node.frozen:
            pre.append(_freeze)
        if node.lora is not None:
            unchecked = valid.builders[name].linear_layers() is None and valid.layouts[name].pp == 1
            pre.append(functools.partial(_with_adapters, lora=node.lora, seed=self.seed, node=name,
                                         every_target_here=unchecked))
        config = config.model_copy(update={"pre_wrap_hooks": pre,
                                           "post_wrap_hooks": [*config.post_wrap_hooks, *node.hooks.post_wrap]})
        seed_rng(self.seed, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank())
        wrap = wrap_with_ddp and not node.frozen  # frozen: no gradients, so no DDP buffers
        ddp = valid.ddp_config(name, ddp_config)
        # Megatron-FSDP per node: the node's ddp option (or the graph-wide argument) picks the wrapper
        options = {**options, "use_megatron_fsdp": options["use_megatron_fsdp"] or ddp.use_megatron_fsdp}
        return config.make_builder().build_distributed_models(pgs, ddp if wrap else None, wrap_with_ddp=wrap, **options)


def _freeze(chunks: list[MegatronModule]) -> list[MegatronModule]:
    for chunk in chunks:
        chunk.requires_grad_(False)
    return chunks


def _with_adapters(chunks: list[MegatronModule], *, lora, seed: int, node: str,
                   every_target_here: bool) -> list[MegatronModule]:
    add_adapters(chunks, lora, seed, node, every_target_here)
    return chunks


def _without_frames(err: BaseException) -> BaseException:
    """``err`` with its traceback kept as text (``trace``) and its frames let go: they hold the
    failed node's groups, and an aborted gloo group keeps its sockets open, its peers blocked
    until their timeout, while anything references it."""
    err.trace = "".join(traceback.format_exception(err))
    chain, link = set(), err
    while link is not None and id(link) not in chain:
        chain.add(id(link))
        link.with_traceback(None)
        link = link.__cause__ or link.__context__
    return err


def _renamed(port: Port, name: str) -> Port:
    return dataclasses.replace(port, name=name)  # every other field (dtype, high, like) kept


def _publish(node: str, failure: BaseException, key: str) -> None:
    """This rank's failure building ``node``, unless a peer's came first (the root cause)."""
    message = f"rank {dist.get_rank()} failed building node '{node}': {type(failure).__name__}: {failure}"
    private.default_store().compare_set(key, "", message)


def _agree(control, node: str, failure: BaseException | None, key: str) -> None:
    """All ranks learn whether any rank failed building ``node``; every rank raises if so."""
    store = private.default_store()
    flag = torch.tensor([0 if failure is None else 1])
    try:
        dist.all_reduce(flag, group=control)
    except Exception as err:  # a peer left the collective: its failure is published
        raise BuildError(_published(store, key, node)) from err
    if flag.item():
        error = BuildError(_published(store, key, node))
        error.trace = getattr(failure, "trace", "")  # this rank's own failure: where it happened
        raise error from failure


def _published(store, key: str, node: str) -> str:
    try:
        store.wait([key], datetime.timedelta(seconds=10))
        return store.get(key).decode()
    except Exception:
        return f"a rank failed while building node '{node}' (no message was published)"
