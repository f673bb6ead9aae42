"""Forward and backward of a CompositeModel over its DAG, pipelined over microbatches.

Each node is cut into its (virtual) pipeline stages and the whole graph runs as one pipeline
(:mod:`~mimo_builder._internal.runtime.pipeline`): every rank executes its forwards and backwards in the
planned 1F1B-style order, so encoder ranks work on the next microbatch while the backbone works
on this one. Activations arriving at a stage become detached leaves, so each stage's backward is
its own autograd call; input gradients go back over the same transfers, scaled by
``dp_producer / dp_consumer`` so that, after each node's DDP averages over its own DP group,
every parameter holds the gradient of the step's loss (a mean over the global batch's loss
tokens: :mod:`~mimo_builder._internal.runtime.loss_tokens`). An operation's sends leave with the
rank's next receive as one group, and receives take each channel's messages in send order
(:class:`~mimo_builder._internal.runtime.bridge.Mailbox`): NCCL's point-to-point rules hold.
Gradients accumulate across microbatches in DDP's buffers.
"""

from __future__ import annotations

import gc
import traceback

import torch
import torch.distributed as dist

from mimo_builder._internal.errors import MimoError
from mimo_builder._internal.placement import dp_groups, release, tp_cp_groups
from mimo_builder._internal.runtime.batch import check_batch, check_rank_batch, check_split
from mimo_builder._internal.runtime.batching import batched_nodes
from mimo_builder._internal.runtime.pipeline import PipelinePlan, needs_grad, plan_graph
from mimo_builder._internal.runtime.port_check import PortContract
from mimo_builder._internal.runtime.posting import posting_plan, rank_ops
from mimo_builder._internal.runtime.generation import GenerationOptions, generate
from mimo_builder._internal.runtime.loss_tokens import LossShares, global_counts, loss_shares
from mimo_builder._internal.runtime.optim import check_runnable
from mimo_builder._internal.runtime.outputs import check_requested, gathered_outputs, global_loss, output_means
from mimo_builder._internal.runtime.balance import balancing_ports, node_exchanges
from mimo_builder._internal.runtime.items import Items, ragged_nodes
from mimo_builder._internal.runtime.routes import Routes
from mimo_builder._internal.runtime.shards import RankBatch
from mimo_builder._internal.runtime.step import Step
from mimo_builder._internal.runtime.timing import NoTimer, PhaseTimer
from mimo_builder._internal.assembly.walker import CompositeModel
from mimo_builder._internal.platform import private


class StepError(MimoError, RuntimeError):
    """A forward/backward failed on some rank; raised on every rank with the root cause
    (``trace``: this rank's own traceback, as text)."""

    trace: str = ""


class GraphSchedule:
    """Runs forward/backward of a built graph; one instance per CompositeModel, on every rank.

    ``max_in_flight`` caps the microbatches any stage holds at once (None: 1F1B's own depth;
    1: the sequential schedule, one microbatch through the whole graph at a time).
    ``timer`` receives the time of each node's forward, backward and communication.
    """

    def __init__(self, model: CompositeModel, device: torch.device | None = None, *,
                 max_in_flight: int | None = None, timer: PhaseTimer | None = None):
        self.model = model
        self.timer = timer or NoTimer()
        self.max_in_flight = max_in_flight
        self.valid = model.valid
        self.rank = dist.get_rank()
        self.device = device or torch.device("cpu")
        check_runnable(self.valid)
        self.guard = model.guard
        # The schedule's own groups: on a failure it can drop them, which wakes peers waiting
        # in them (a gloo wait cannot be aborted otherwise); they go when the model closes.
        self.bridge = dist.new_group(backend=dist.get_backend())  # all ranks; group rank == global rank
        self.control = dist.new_group(backend="gloo")
        if dist.get_backend(self.bridge) == "nccl":  # NCCL: the first call on a group that batches
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.bridge)  # P2P must have all ranks
        self.tp_groups = tp_cp_groups(model.valid.layouts.values())
        self.dp_groups = dp_groups(model.valid.layouts[node] for node in balancing_ports(model.valid))
        model.on_close(self.close)
        self.needs_grad = needs_grad(self.valid)
        self.contract = PortContract(self.valid)
        self.exchanges = node_exchanges(model, self.dp_groups, self.device)
        self.contract.announce()
        self.loss_outputs = [(n, p) for n, p in self.valid.outputs if p == "loss"]
        self.failed: str | None = None
        self._plans: dict[tuple[int, int], tuple[PipelinePlan, Routes, dict]] = {}
        self._headers: dict = {}
        self._current: Step | None = None

    def ragged_links(self, routes: Routes) -> frozenset[int]:
        """Links between nodes that carry the tokens of ragged items (shapes vary by microbatch)."""
        nodes = ragged_nodes(self.valid)
        return frozenset(i for i, link in enumerate(routes.links) if link.edge is not None and link.src.node in nodes)

    def plan(self, num_microbatches: int) -> PipelinePlan:
        """The pipeline every rank runs for ``num_microbatches``, encoders batched where they
        qualify (:mod:`~mimo_builder._internal.runtime.batching`)."""
        batched = batched_nodes(self.valid, num_microbatches, self.device)
        return plan_graph(self.valid, num_microbatches, self.max_in_flight, batched)

    # --- public -----------------------------------------------------------------------------

    def forward_backward(self, batch: dict[str, torch.Tensor] | RankBatch, num_microbatches: int = 1) -> float:
        """Forward and backward over ``batch`` in ``num_microbatches`` parts; returns the loss: each
        loss output's mean over the global batch's loss tokens, summed over loss outputs, the same
        for any microbatch count and placement (:mod:`~mimo_builder._internal.runtime.loss_tokens`).

        ``batch`` is the whole global batch (the same on every rank), or this rank's share of it
        (a :class:`~mimo_builder._internal.runtime.shards.RankBatch`, e.g. from a per-rank data loader).
        """
        self.guard.begin_step()  # before the check: a failure there is published under this step
        batch, per, signature, totals = self._checked(batch, num_microbatches)
        with self.guard.watch("forward_backward"):
            try:
                shares = loss_shares(self.valid, batch, self.rank, totals, self.control)
                step = self._run(batch, num_microbatches, per, signature, shares)
                return global_loss(self.valid, step.losses, self.rank, self.control)
            except Exception as err:
                self._fail(err)

    def evaluate(self, batch: dict[str, torch.Tensor] | RankBatch, num_microbatches: int = 1,
                 outputs: list[str] | None = None) -> dict[str, float | torch.Tensor]:
        """Forward only (no gradients, modules in eval mode): each graph output that is a loss (a
        scalar: its mean over the global batch's loss tokens, as the step's) or one value per sample
        (averaged over the global batch), as ``{"node.port": mean}`` on every rank. ``outputs`` names
        further ``node.port`` outputs, of any node, returned whole on global rank 0 as tensors
        (every sample in order, TP pieces joined)."""
        wanted = check_requested(self.valid, outputs or [])
        self.guard.begin_step()  # before the check: a failure there is published under this step
        batch, per, signature, totals = self._checked(batch, num_microbatches)
        chunks = [chunk for name in self.valid.order if self.model.hosts(name) for chunk in self.model.chunks(name)]
        modes = [chunk.training for chunk in chunks]
        with self.guard.watch("evaluate"), torch.no_grad():
            try:
                for chunk in chunks:
                    chunk.eval()
                self.contract.announce(wanted)  # (every evaluate says what it reads)
                shares = loss_shares(self.valid, batch, self.rank, totals, self.control)
                step = self._run(batch, num_microbatches, per, signature, shares, forward_only=True)
                means = output_means(self.valid, step.outputs, self.rank, batch.size, shares, self.control)
                return {**means, **gathered_outputs(self.valid, step.outputs, wanted, self.rank, per, self.control)}
            except Exception as err:
                self._fail(err)
            finally:
                for chunk, mode in zip(chunks, modes):
                    chunk.train(mode)

    def generate(self, batch: dict[str, torch.Tensor] | RankBatch, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, eos_id: int | None = None, num_microbatches: int = 1,
                 pad_id: int | None = None):
        """New tokens ``[batch, max_new_tokens]`` after each sample's prompt (its ids before the first
        loss-masked label; in a graph that binds no loss mask, up to its last token other than
        ``pad_id``) on global rank 0, None elsewhere: see :mod:`mimo_builder._internal.runtime.generation`."""
        options = GenerationOptions(max_new_tokens, temperature, top_k, seed, eos_id, pad_id)
        return generate(self, batch, options, num_microbatches)

    def _checked(self, batch, num_microbatches: int) -> tuple[RankBatch, int, tuple | None, dict | None]:
        """:meth:`_prepare`; a problem in this rank's own share is published like a step failure,
        since no other rank sees that share (a global batch is checked alike on every rank)."""
        if not isinstance(batch, RankBatch) or self.failed is not None:
            return self._prepare(batch, num_microbatches)
        try:
            return self._prepare(batch, num_microbatches)
        except Exception as err:
            self._fail(err, where="its share of the batch")

    def _prepare(self, batch, num_microbatches: int) -> tuple[RankBatch, int, tuple | None, dict | None]:
        """Check ``batch`` and return this rank's share, the microbatch size, the batch's signature
        and its loss-token counts by loss node (both None for a share: it does not show the other
        ranks' shapes or tokens)."""
        if isinstance(batch, RankBatch):
            size, signature = check_rank_batch(self.valid, batch, self.rank, num_microbatches), None
        else:
            size, signature = check_batch(self.valid, batch), _signature(batch)
        per = check_split(self.valid, size, num_microbatches)
        if self.failed is not None:
            raise StepError(f"this schedule already failed ({self.failed}); build the graph again")
        totals = None
        if not isinstance(batch, RankBatch):
            totals = global_counts(self.valid, batch)
            batch = RankBatch.from_global(self.valid, batch, self.rank, num_microbatches)
        return batch, per, signature, totals

    def close(self) -> None:
        """Release the schedule's own groups (called by ``CompositeModel.close``; idempotent)."""
        release(self.bridge, self.control, *self.tp_groups.values(), *self.dp_groups.values())
        self.bridge, self.control, self.tp_groups, self.dp_groups, self.exchanges = None, None, {}, {}, {}

    def _run(self, batch: RankBatch, num_microbatches: int, per: int, signature, shares: LossShares,
             forward_only: bool = False):
        key = (num_microbatches, per)
        if key not in self._plans:
            plan = self.plan(num_microbatches)
            self._plans[key] = (plan, Routes(plan, self.valid.edges, self.valid.layouts, self.needs_grad, per), {})
        plan, routes, postings = self._plans[key]
        if forward_only not in postings:
            postings[forward_only] = posting_plan(plan, routes, forward_only)
        # activations carry their shape the first time a batch signature is seen on every rank;
        # a rank's share does not show the other ranks' shapes, so then every step carries them
        headers = self._headers.setdefault((key, signature), {}) if signature is not None else {}
        posting = postings[forward_only]
        step = self._current = Step(self, batch, per, num_microbatches, routes, headers, forward_only,
                                     posting.messages.get(self.rank, []), shares)
        for index, op in enumerate(rank_ops(plan, self.rank, forward_only)):
            step.run(op, posting.by_start[self.rank][index], posting.by_end[self.rank][index])
        step.where = "the end of the step"
        step.mailbox.close()
        self._current = None
        return step

    # --- helpers ----------------------------------------------------------------------------

    def _fail(self, err: Exception, where: str | None = None) -> None:
        """Publish the first failure, break every collective this rank is in, raise everywhere."""
        where = where or (self._current.where if self._current is not None else "the end of the step")
        first = self.guard.publish_error(where, err)
        self.failed = first
        error = StepError(first)
        error.trace = "".join(traceback.format_exception(err))
        err.with_traceback(None)  # its frames hold the schedule's groups, which must go now
        self.model.process_groups.abort()
        self._drop_own_groups()
        raise error from err

    def _drop_own_groups(self) -> None:
        """Wake the peers blocked in the schedule's groups with this rank. NCCL's abort does; an
        aborted gloo group keeps its sockets open until the group object is gone, so every
        reference is dropped (the traceback too: its frames hold the group)."""
        groups = [self.bridge, self.control, *self.tp_groups.values(), *self.dp_groups.values()]
        if dist.get_backend(self.bridge) != "gloo":
            for group in groups:
                private.abort_group(group)
            return
        self.close()
        if self._current is not None:
            self._current.mailbox.drop()
            self._current = None  # its activations' autograd graph holds the item exchange's group
        del groups
        gc.collect()  # the group objects must go now, not at some later collection


def _signature(batch: dict) -> tuple:
    return tuple((k, v.signature()) if isinstance(v, Items) else (k, tuple(v.shape), v.dtype)
                 for k, v in sorted(batch.items()))
