"""Forward and backward of a CompositeModel over its DAG, on any placement.

Forward walks the nodes in topological order: an edge's samples arrive through the bridge and
become a detached leaf on the consumer, so each node's backward is its own autograd call.
Backward walks in reverse: consumers' input gradients go back over the same transfers, scaled
by ``dp_producer / dp_consumer`` so that, after each node's DDP averages over its own DP group,
every parameter holds the gradient of the global mean loss. All forwards of a microbatch run,
then all its backwards; gradients accumulate across microbatches in DDP's buffers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mimo_builder.errors import MimoError
from mimo_builder.runtime.batch import check_batch, dp_shard, shard_range
from mimo_builder.runtime.bridge import broadcast_tensor, edge_transfers, recv_into, recv_tensor, send_tensor
from mimo_builder.validation import Edge
from mimo_builder.walker import CompositeModel

_FAILURE_KEY = "mimo_builder/step_failure"


class StepError(MimoError, RuntimeError):
    """A forward/backward failed on some rank; raised on every rank with the root cause."""


@dataclass
class _Microbatch:
    batch: dict[str, torch.Tensor]
    size: int
    outputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    leaves: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    out_grads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class GraphSchedule:
    """Runs forward/backward of a built graph; one instance per CompositeModel, on every rank."""

    def __init__(self, model: CompositeModel, device: torch.device | None = None):
        self.model = model
        self.valid = model.valid
        self.rank = dist.get_rank()
        self.device = device or torch.device("cpu")
        self.bridge = dist.new_group(backend=dist.get_backend())  # all ranks; group rank == global rank
        self.control = dist.new_group(backend="gloo")
        check_runnable(self.valid)
        self.needs_grad = _needs_grad(self.valid)
        self.loss_outputs = [(n, p) for n, p in self.valid.outputs if p == "loss"]
        self.step = 0
        self.failed: str | None = None
        edges = sorted(self.valid.edges, key=str)  # the one global order of transfers
        self._incoming = {n: [e for e in edges if e.dst == n] for n in self.valid.order}
        self._outgoing = {n: [e for e in edges if e.src == n] for n in self.valid.order}

    def _grad_sync_deferred(self, last: bool) -> contextlib.ExitStack:
        """DDP's ``no_sync`` on every hosted chunk, except for the last microbatch, so that an
        overlapped gradient reduction never starts on partial gradients."""
        stack = contextlib.ExitStack()
        if not last:
            for name in self.valid.order:
                if self.model.hosts(name):
                    for chunk in self.model.chunks(name):
                        if hasattr(chunk, "no_sync"):
                            stack.enter_context(chunk.no_sync())
        return stack

    # --- public -----------------------------------------------------------------------------

    def forward_backward(self, batch: dict[str, torch.Tensor], num_microbatches: int = 1) -> float:
        """Forward and backward over ``batch`` in ``num_microbatches`` parts; returns the mean loss."""
        size = check_batch(self.valid, batch)
        if size % num_microbatches:
            raise StepError(f"batch size {size} is not divisible by num_microbatches={num_microbatches}")
        per = size // num_microbatches
        for name, layout in self.valid.layouts.items():
            if per % layout.dp:
                raise StepError(f"microbatch size {per} is not divisible by node '{name}' DP size {layout.dp}")
        if self.failed is not None:
            raise StepError(f"this schedule already failed ({self.failed}); build the graph again")
        self.step += 1
        losses: dict[str, float] = {}
        try:
            for i in range(num_microbatches):
                mb = _Microbatch({k: v[i * per:(i + 1) * per] for k, v in batch.items()}, per)
                with self._grad_sync_deferred(last=i == num_microbatches - 1):
                    self._forward(mb)
                    for node, value in self._backward(mb, scale=1.0 / num_microbatches).items():
                        losses[node] = losses.get(node, 0.0) + value / num_microbatches
            return self._global_loss(losses)
        except Exception as err:
            self._fail(err)

    # --- forward ----------------------------------------------------------------------------

    def _forward(self, mb: _Microbatch) -> None:
        for name in self.valid.order:
            for edge in self._edges_into(name):
                self._send_activation(edge, mb)
            if self.model.hosts(name):
                inputs = {port: dp_shard(mb.batch[key].to(self.device), self.valid.layouts[name], self.rank, mb.size)
                          for key, (node, port) in self.valid.inputs.items() if node == name and key in mb.batch}
                inputs.update(mb.leaves.get(name, {}))
                (chunk,) = self.model.chunks(name)
                mb.outputs[name] = self.valid.builders[name].run(chunk, inputs)

    def _send_activation(self, edge: Edge, mb: _Microbatch) -> None:
        producer, consumer = self.valid.layouts[edge.src], self.valid.layouts[edge.dst]
        parts = []
        for t in edge_transfers(producer, consumer, mb.size):
            if t.src == self.rank:
                start = self._shard_start(producer, mb.size)
                piece = mb.outputs[edge.src][edge.src_port][t.start - start:t.stop - start]
                if t.dst == self.rank:
                    parts.append(piece.detach())
                else:
                    send_tensor(piece.detach(), t.dst, self.bridge)
            elif t.dst == self.rank:
                parts.append(recv_tensor(t.src, self.device, self.bridge))
        if not self.model.hosts(edge.dst):
            return
        value = torch.cat(parts) if parts else None
        value = self._tp_broadcast(edge.dst, value)
        leaf = value.detach().requires_grad_(self.needs_grad[edge.src])
        mb.leaves.setdefault(edge.dst, {})[edge.dst_port] = leaf

    # --- backward ---------------------------------------------------------------------------

    def _backward(self, mb: _Microbatch, scale: float) -> dict[str, float]:
        losses = {}
        for name in reversed(self.valid.order):
            for edge in self._edges_out_of(name):
                self._send_gradient(edge, mb)
            if not self.model.hosts(name):
                continue
            grads = mb.out_grads.setdefault(name, {})
            for port in sorted({e.src_port for e in self._edges_out_of(name)} if self.needs_grad[name] else ()):
                grads[port] = self._tp_broadcast(name, grads.get(port))  # only TP rank 0 received them
            loss = self._node_backward(name, mb, scale)
            if loss is not None:
                losses[name] = loss
        return losses

    def _node_backward(self, name: str, mb: _Microbatch, scale: float) -> float | None:
        """Backward of one node's outputs; returns its loss value if it outputs the loss."""
        tensors, grads, loss_value = [], [], None
        for node, port in self.loss_outputs:
            if node == name:
                loss = mb.outputs[name][port]
                loss_value = float(loss.detach())
                tensors.append(loss * scale)
                grads.append(None)
        for port, grad in mb.out_grads.get(name, {}).items():
            tensors.append(mb.outputs[name][port])
            grads.append(grad.to(mb.outputs[name][port].dtype))
        if self.needs_grad[name] and any(t.requires_grad for t in tensors):
            torch.autograd.backward([t for t in tensors if t.requires_grad],
                                    [g for t, g in zip(tensors, grads) if t.requires_grad])
        return loss_value

    def _send_gradient(self, edge: Edge, mb: _Microbatch) -> None:
        if not self.needs_grad[edge.src]:
            return
        producer, consumer = self.valid.layouts[edge.src], self.valid.layouts[edge.dst]
        ratio = producer.dp / consumer.dp  # see the module docstring
        for t in edge_transfers(producer, consumer, mb.size):
            if t.dst == self.rank:
                leaf = mb.leaves[edge.dst][edge.dst_port]
                start = self._shard_start(consumer, mb.size)
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                piece = grad[t.start - start:t.stop - start] * ratio
                if t.src == self.rank:
                    self._accumulate(edge, mb, producer, t, piece)
                else:  # the producer knows the shape: it sent this slice forward
                    send_tensor(piece.to(leaf.dtype), t.src, self.bridge, header=False)
            elif t.src == self.rank:
                start = self._shard_start(producer, mb.size)
                sent = mb.outputs[edge.src][edge.src_port][t.start - start:t.stop - start]
                piece = recv_into(torch.empty(sent.shape, dtype=sent.dtype, device=self.device), t.dst, self.bridge)
                self._accumulate(edge, mb, producer, t, piece)

    def _accumulate(self, edge, mb, producer, t, piece) -> None:
        output = mb.outputs[edge.src][edge.src_port]
        grads = mb.out_grads.setdefault(edge.src, {})
        if edge.src_port not in grads:
            grads[edge.src_port] = torch.zeros(output.shape, dtype=torch.float32, device=self.device)
        start = self._shard_start(producer, mb.size)
        grads[edge.src_port][t.start - start:t.stop - start] += piece.float()

    # --- helpers ----------------------------------------------------------------------------

    def _tp_broadcast(self, name: str, value: torch.Tensor | None) -> torch.Tensor:
        """Share a tensor held by the node's first TP rank with the rest of its TP group."""
        pgs = self.model.pg_collection(name)
        if pgs.tp.size() == 1:
            return value
        return broadcast_tensor(value, dist.get_global_rank(pgs.tp, 0), pgs.tp, self.device)

    def _edges_into(self, name: str) -> list[Edge]:
        return self._incoming[name]

    def _edges_out_of(self, name: str) -> list[Edge]:
        return self._outgoing[name]

    def _shard_start(self, layout, batch_size: int) -> int:
        """First global sample of this rank's DP shard of a node with ``layout``."""
        return shard_range(layout, layout.coords(self.rank)["dp"], batch_size)[0]

    def _global_loss(self, local: dict[str, float]) -> float:
        """Sum over loss nodes of each node's mean loss over the global batch, on every rank."""
        value = torch.zeros(1, dtype=torch.float64)
        for node, loss in local.items():
            if self.valid.layouts[node].coords(self.rank)["tp"] == 0:
                value += loss / self.valid.layouts[node].dp
        dist.all_reduce(value, group=self.control)
        return float(value)

    def _fail(self, err: Exception) -> None:
        """Publish the first failure, break every collective this rank is in, raise everywhere."""
        store = dist.distributed_c10d._get_default_store()
        key = f"{_FAILURE_KEY}/{self.bridge.group_name}/{self.step}"  # the same name on every rank
        first = store.compare_set(key, "", f"rank {self.rank}: {type(err).__name__}: {err}").decode()
        self.failed = first
        self.model.process_groups.abort()
        for group in (self.bridge, self.control):
            dist.distributed_c10d._abort_process_group(group)
        raise StepError(first) from err


def _needs_grad(valid) -> dict[str, bool]:
    """A node runs backward if it trains or feeds on a node that does."""
    out = {}
    for name in valid.order:
        upstream = any(out[e.src] for e in valid.edges if e.dst == name)
        out[name] = upstream or not valid.graph.nodes[name].frozen
    return out


def check_runnable(valid) -> None:
    """Raise StepError for graphs the runtime cannot execute yet (before anything is built)."""
    for name in valid.order:
        if getattr(valid.configs[name], "dtype", None) == "fp16" and not valid.graph.nodes[name].frozen:
            raise StepError(f"node '{name}' config.dtype: fp16 training needs loss scaling, which the graph "
                            "optimizer does not apply; use bf16 (fp32 master weights) or freeze the node")
    for name, layout in valid.layouts.items():
        if layout.pp > 1 or layout.cp > 1:
            raise StepError(f"node '{name}' has pp={layout.pp}, cp={layout.cp}: the runtime executes "
                            "pp=1 and cp=1 nodes only for now (pipeline/context parallelism inside a node "
                            "is not scheduled yet); build-only use of such graphs works")
