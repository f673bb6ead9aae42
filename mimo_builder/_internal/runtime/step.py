"""One forward_backward on one rank: its operations in planned order, their tensors and messages.

An operation receives its inputs (activations, or its outputs' gradients), runs the stage's
forward or backward, and sends what it produced; :class:`~mimo_builder._internal.runtime.bridge.Mailbox`
posts the messages where :mod:`~mimo_builder._internal.runtime.posting` says. A batched stage
(:mod:`~mimo_builder._internal.runtime.batching`) computes at its first operation for every microbatch,
over their rows laid end to end, and each of its operations then sends its own microbatch's part.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimo_builder._internal.runtime.batch import shard_range
from mimo_builder._internal.runtime.bridge import Mailbox, broadcast_tensor
from mimo_builder._internal.runtime.generation import SAMPLE_INDEX
from mimo_builder._internal.runtime.items import Items, join_padded
from mimo_builder._internal.runtime.loss_tokens import LossShares
from mimo_builder._internal.runtime.packing import PackingError
from mimo_builder._internal.runtime.pipeline import FORWARD, Op, Stage
from mimo_builder._internal.runtime.routes import Routes
from mimo_builder._internal.runtime.shards import RankBatch, joined


@dataclass
class _StageState:
    """One stage's tensors for one microbatch, from its forward until its backward."""

    leaves: dict[int, torch.Tensor] = field(default_factory=dict)  # link index -> received input
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # (link, transfer) -> tokens sent (ragged)


class Step:
    """One forward_backward on one rank: its operations, their tensors and messages."""

    def __init__(self, schedule, batch: RankBatch, per: int, num_microbatches: int, routes: Routes,
                 headers, forward_only: bool, messages: list, shares: LossShares):
        self.s, self.batch, self.per, self.m = schedule, batch, per, num_microbatches
        self.shares = shares
        """Each loss's share of the global batch's loss tokens, per microbatch."""
        self.forward_only = forward_only
        self.outputs: dict[str, list[dict[str, torch.Tensor]]] = {}
        """Forward only: each last stage's outputs, one dict per microbatch, by node."""
        self.routes, self.rank, self.valid = routes, schedule.rank, schedule.valid
        self.mailbox = Mailbox(schedule.bridge, self.rank, messages, headers, schedule.device, self._gradient_like,
                               schedule.ragged_links(routes))
        self.states: dict[tuple[Stage, int], _StageState] = {}
        self.losses: dict[str, float] = {}
        """This rank's loss terms by node: each microbatch's loss times its share."""
        self.where = "the start of the step"

    def run(self, op: Op, by_start: int, by_end: int) -> None:
        """One operation of this rank's plan, its messages posted up to ``by_start`` before and up
        to ``by_end`` after it (:mod:`~mimo_builder._internal.runtime.posting`); ``where`` names it for
        failure reports."""
        kind = "forward" if op.kind == FORWARD else "backward"
        self.where = f"node '{op.stage.node}' {kind} (microbatch {op.microbatch})"
        self.s.guard.note(self.where)
        with self.s.timer.measure(op.stage.node, "communication"):
            self.mailbox.post(by_start, wait=True)
        self.forward(op) if op.kind == FORWARD else self.backward(op)
        with self.s.timer.measure(op.stage.node, "communication"):
            self.mailbox.post(by_end)

    # --- forward ----------------------------------------------------------------------------

    def forward(self, op: Op) -> None:
        """The op's forward (a batched stage's first op computes every microbatch), then its sends."""
        if op.span == 1:
            inputs, hidden, state = self._receive_inputs(op)
            state.outputs = self._run_stage(op.stage, inputs, hidden)
        elif op.microbatch == 0:
            self._batched_forward(op)
        state = self.states[(op.stage, op.microbatch)]
        with self.s.timer.measure(op.stage.node, "communication"):
            for key, t in self.routes.sends(op, self.rank):
                link = self.routes.links[key[1]]
                value = state.outputs[link.edge.src_port if link.edge else "hidden"]
                self.mailbox.send(key, self._slice(value, link, link.src.node, t.src, t).detach(), t.dst)
        if self.forward_only:  # nothing waits for a backward: keep only the graph's outputs
            if op.stage.last:
                self.outputs.setdefault(op.stage.node, []).append(state.outputs)
            del self.states[(op.stage, op.microbatch)]

    def _receive_inputs(self, op: Op):
        """The stage's inputs for the op's microbatch (batch rows and received activations), the
        hidden states from the previous stage, and its new state holding the received leaves."""
        stage, m = op.stage, op.microbatch
        state = self.states[(stage, m)] = _StageState()
        inputs, hidden = self._batch_inputs(stage.node, m), None
        with self.s.timer.measure(stage.node, "communication"):
            for li in self.routes.in_links[stage]:
                link = self.routes.links[li]
                leaf = self._receive_activation(op, li, state).detach().requires_grad_(self.s.needs_grad[link.src.node])
                state.leaves[li] = leaf
                if link.edge is None:
                    hidden = leaf
                else:
                    inputs[link.edge.dst_port] = leaf
        return inputs, hidden, state

    def _run_stage(self, stage: Stage, inputs: dict, hidden) -> dict[str, torch.Tensor]:
        chunk = self.s.model.chunks(stage.node)[stage.chunk]
        for port, exchange in self.s.exchanges.get(stage.node, {}).items():
            # every DP rank joins the exchange, also one whose share stacked (one item of the port's shape each)
            value = inputs.get(port)
            items = value if isinstance(value, Items) else Items.of_tensor(value)
            inputs = {**inputs, port: items.balanced(exchange)}
        with self.s.timer.measure(stage.node, "forward"):
            try:
                outputs = self.valid.builders[stage.node].run_stage(chunk, inputs, hidden, stage.index == 0, stage.last)
            except PackingError as err:  # raised by the builder, which does not know the node's name
                raise (err if err.node else err.of_node(stage.node)) from None
        if stage.last:
            self.s.contract.check(stage.node, inputs, outputs)
        return outputs

    def _batched_forward(self, op: Op) -> None:
        """Every microbatch's inputs (all received by the run's first op), end to end through one
        forward; each microbatch's state holds its own rows of the outputs."""
        received = [self._receive_inputs(Op(FORWARD, op.stage, m)) for m in range(self.m)]
        inputs = {port: joined([part[port] for part, _, _ in received]) for port in received[0][0]}
        outputs = self._run_stage(op.stage, inputs, None)
        for m, (_, _, state) in enumerate(received):
            state.outputs = {port: _rows(value, m, self.m) for port, value in outputs.items()}

    def _batch_inputs(self, node: str, m: int) -> dict[str, torch.Tensor]:
        inputs = {port: self.batch.microbatch(key, m).to(self.s.device)
                  for key, (n, port) in self.valid.inputs.items() if n == node and key in self.batch.rows}
        if getattr(self.valid.builders[node], "generation", None) is not None:  # a stream per sample
            layout = self.valid.layouts[node]
            start = m * self.per + shard_range(layout, layout.coords(self.rank)["dp"], self.per)[0]
            inputs[SAMPLE_INDEX] = torch.arange(start, start + self.per // layout.dp, device=self.s.device)
        return inputs

    def _receive_activation(self, op: Op, li: int, state: _StageState) -> torch.Tensor:
        received = [(key, self.mailbox.take(key, t.src)) for key, t in self.routes.receives(op, self.rank, li)]
        parts = [part for _, part in received]
        link = self.routes.links[li]
        if link.edge is None:
            (value,) = parts
            return value
        if len({p.shape[1:] for p in parts}) > 1:  # ragged items: each producer padded its own rows
            state.tokens.update({(li, key[3]): p.shape[1] for key, p in received})
        value = join_padded(parts) if parts else None
        return self._tp_broadcast(link.dst.node, value)

    def _slice(self, value: torch.Tensor, link, node: str, rank: int, t) -> torch.Tensor:
        """The samples of transfer ``t`` in ``rank``'s shard of ``node``'s ``value`` (batch-first
        ports; hidden states inside a node travel whole)."""
        if link.edge is None:
            return value
        layout = self.valid.layouts[node]
        start = shard_range(layout, layout.coords(rank)["dp"], self.per)[0]
        return value[t.start - start:t.stop - start]

    def _gradient_like(self, key) -> torch.Tensor:
        """The producer-side tensor whose gradient message ``key`` carries (its shape and dtype)."""
        _, li, m, ti = key
        link, t = self.routes.links[li], self.routes.transfers[li][ti]
        output = self.states[(link.src, m)].outputs[link.edge.src_port if link.edge else "hidden"]
        return self._slice(output, link, link.src.node, t.src, t)

    # --- backward ---------------------------------------------------------------------------

    def backward(self, op: Op) -> None:
        """The op's backward (a batched stage's first op runs it for every microbatch), then the
        input gradients of the op's microbatch go back."""
        stage, m = op.stage, op.microbatch
        if op.span == 1:
            self._run_backward(stage, [op], last=m == self.m - 1)
        elif m == 0:  # every microbatch's output gradients are here: one backward for all
            self._run_backward(stage, [Op(op.kind, stage, k) for k in range(self.m)], last=True)
        with self.s.timer.measure(stage.node, "communication"):
            self._send_input_gradients(op, self.states[(stage, m)])
        del self.states[(stage, m)]

    def _run_backward(self, stage: Stage, ops: list[Op], last: bool) -> None:
        """One autograd call over the outputs of ``ops`` (one stage) with their gradients; DDP
        reduces at the step's last backward of the stage only."""
        tensors, grads = [], []
        with self.s.timer.measure(stage.node, "communication"):
            for op in ops:
                more_tensors, more_grads = self._output_gradients(op, self.states[(stage, op.microbatch)])
                tensors += more_tensors
                grads += more_grads
        chunk = self.s.model.chunks(stage.node)[stage.chunk]
        deferred = chunk.no_sync() if hasattr(chunk, "no_sync") and not last else contextlib.nullcontext()
        with deferred, self.s.timer.measure(stage.node, "backward"):
            pairs = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

    def _output_gradients(self, op: Op, state: _StageState):
        """The stage's outputs with the gradients its consumers sent back (and its loss terms)."""
        stage = op.stage
        tensors, grads = self._loss_terms(op, state)
        for li in self.routes.out_links[stage]:
            link = self.routes.links[li]
            port = link.edge.src_port if link.edge else "hidden"
            output = state.outputs[port]
            grad = self._received_gradient(op, li, output)
            if link.edge is not None:  # a rank that received nothing takes its first TP rank's
                grad = self._tp_broadcast(stage.node, grad)
            if grad is None:
                grad = torch.zeros_like(output)
            tensors.append(output)
            grads.append(grad.to(output.dtype))
        return tensors, grads

    def _received_gradient(self, op: Op, li: int, output: torch.Tensor) -> torch.Tensor | None:
        """The gradient of ``output`` its consumers on link ``li`` sent back: one piece of the
        whole shape as it came, else the pieces summed into their rows in fp32; None when none
        comes to this rank."""
        link = self.routes.links[li]
        pieces = [(t, self.mailbox.take(key, t.dst)) for key, t in self.routes.receives(op, self.rank, li)]
        if not pieces:
            return None
        if output.dim() > 2:  # a consumer that padded ragged tokens further sends its longer rows
            pieces = [(t, piece[:, :output.shape[1]]) for t, piece in pieces]
        if len(pieces) == 1 and pieces[0][1].shape == output.shape:
            return pieces[0][1]
        grad = torch.zeros(output.shape, dtype=torch.float32, device=self.s.device)
        for t, piece in pieces:
            self._slice(grad, link, link.src.node, t.src, t).add_(piece.float())
        return grad

    def _send_input_gradients(self, op: Op, state: _StageState) -> None:
        self._combine_cp_gradients(op, state)
        for key, t in self.routes.sends(op, self.rank):
            link = self.routes.links[key[1]]
            leaf = state.leaves[key[1]]
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            ratio = self.valid.layouts[link.src.node].dp / self.valid.layouts[link.dst.node].dp
            piece = self._slice(grad, link, link.dst.node, t.dst, t) if link.edge else grad
            piece = piece * ratio if ratio != 1 else piece
            if (key[1], key[3]) in state.tokens:  # back to the producer's own padding
                piece = piece[:, :state.tokens[(key[1], key[3])]]
            self.mailbox.send(key, piece.to(leaf.dtype), t.src)

    def _combine_cp_gradients(self, op: Op, state: _StageState) -> None:
        """Under context parallelism each CP rank's input gradient holds its own tokens' part
        (scaled by cp, see ``_loss_terms``): their sum over the CP ranks, divided by cp, is the
        input's gradient. TP ranks hold equal copies, so the mean over the TP x CP group does it."""
        layout = self.valid.layouts[op.stage.node]
        if layout.cp == 1:
            return
        group = self.s.tp_groups[layout]
        for li in self.routes.in_links[op.stage]:
            link = self.routes.links[li]
            if link.edge is not None and self.s.needs_grad[link.src.node]:
                leaf = state.leaves[li]
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                dist.all_reduce(grad, group=group)
                leaf.grad = grad / (layout.tp * layout.cp)

    def _loss_terms(self, op: Op, state: _StageState):
        """Each loss of the op's microbatch times its share of the global batch's loss tokens, its
        backward on that times dp * cp, since DDP averages gradients over DP x CP (MCore's
        ``forward_step`` scales by cp alike). A shard without loss tokens adds nothing, yet runs its
        backward at weight 0 (DDP's overlapped grad sync waits for every parameter's gradient at
        the last microbatch) unless its mean is not finite (a builder's 0 / 0)."""
        tensors, grads = [], []
        if op.stage.last:
            for node, port in self.s.loss_outputs:
                if node != op.stage.node:
                    continue
                loss, share = state.outputs[port], self.shares.share(node, op.microbatch)
                if share:
                    self.losses[node] = self.losses.get(node, 0.0) + float(loss.detach()) * share
                if share or bool(torch.isfinite(loss.detach())):
                    tensors.append(loss * self.shares.scale(self.valid, node, op.microbatch))
                    grads.append(None)
        return tensors, grads

    def _tp_broadcast(self, name: str, value: torch.Tensor | None) -> torch.Tensor:
        """Share a tensor held by the node's first TP (and CP) rank with the rest of its TP x CP
        group: every CP rank takes the whole input (the builder keeps its part of the sequence)."""
        group = self.s.tp_groups.get(self.valid.layouts[name])
        if group is None:
            return value
        return broadcast_tensor(value, dist.get_global_rank(group, 0), group, self.s.device)


def _rows(value: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Microbatch ``m``'s rows of a batched output (a tensor without ``count`` equal row blocks
    stays whole)."""
    if value.dim() == 0 or value.shape[0] % count:
        return value
    rows = value.shape[0] // count
    return value[m * rows:(m + 1) * rows]
