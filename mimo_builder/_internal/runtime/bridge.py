"""Moving activations and gradients between nodes that live on different ranks or DP sizes.

An edge's samples are matched by position in the global batch: producer DP rank ``p`` holds
samples ``[p*B/dp_p, (p+1)*B/dp_p)``, consumer DP rank ``c`` needs ``[c*B/dp_c, ...)``. Each
overlap is one :class:`Transfer` from the producer's first tensor-parallel rank to the
consumer's, by point-to-point send/recv (gloo or NCCL), followed by a broadcast inside the
consumer's TP group. Fan-in and fan-out fall out of the overlaps. Every rank walks the
transfers in one global order, so blocking sends and receives cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimo_builder._internal.placement import Layout
from mimo_builder._internal.runtime.batch import shard_range

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)
_HEADER = 8  # dtype code, ndim, up to 6 sizes


@dataclass(frozen=True)
class Transfer:
    """Samples ``[start, stop)`` of the global batch going from rank ``src`` to rank ``dst``."""

    src: int
    dst: int
    start: int
    stop: int


def edge_transfers(producer: Layout, consumer: Layout, batch_size: int) -> list[Transfer]:
    """The transfers of one edge, ordered by consumer DP rank then sample position."""
    out = []
    for c in range(consumer.dp):
        c_start, c_stop = shard_range(consumer, c, batch_size)
        for p in range(producer.dp):
            p_start, p_stop = shard_range(producer, p, batch_size)
            start, stop = max(c_start, p_start), min(c_stop, p_stop)
            if start < stop:
                src = producer.rank_of(dp=p, pp=producer.pp - 1)
                out.append(Transfer(src, consumer.rank_of(dp=c), start, stop))
    return out


def send_tensor(tensor: torch.Tensor, dst: int, group=None, header: bool = True) -> None:
    """Send a header (dtype, shape) then the data, so the receiver needs to know nothing; without
    the header (one message instead of two) the receiver must use :func:`recv_into`."""
    if header:
        dist.send(_header(tensor), dst, group=group)
    dist.send(tensor.contiguous(), dst, group=group)


def recv_into(buffer: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Receive a header-less tensor whose shape and dtype the receiver already knows."""
    dist.recv(buffer, src, group=group)
    return buffer


def recv_tensor(src: int, device: torch.device, group=None) -> torch.Tensor:
    """Receive a tensor :func:`send_tensor` sent with its header: a new tensor of the sent dtype and shape."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    out = torch.empty(_shape(header), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(out, src, group=group)
    return out


def broadcast_tensor(tensor: torch.Tensor | None, src: int, group, device: torch.device) -> torch.Tensor:
    """Broadcast ``tensor`` from global rank ``src`` to ``group``. The other ranks receive into a
    new tensor of the sender's dtype and shape (what they pass is ignored: a buffer of another
    dtype would take the bytes as they come, which gloo does without a word)."""
    source = dist.get_rank() == src
    header = _header(tensor).to(device) if source else torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, src, group=group)
    if not source:
        tensor = torch.empty(_shape(header), dtype=_DTYPES[int(header[0])], device=device)
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src, group=group)
    return tensor


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _HEADER - 2:
        raise ValueError(f"bridge tensors have at most {_HEADER - 2} axes, got shape {tuple(tensor.shape)}")
    header = torch.zeros(_HEADER, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


def _shape(header: torch.Tensor) -> list[int]:
    return header[2:2 + int(header[1])].tolist()


class Mailbox:
    """One rank's point-to-point messages for one step, posted in the order
    :mod:`~mimo_builder._internal.runtime.posting` gives them: an operation's outputs are handed over with
    :meth:`send`, :meth:`post` posts the rank's messages up to a point of that order as one group
    (waiting for the receives when asked), and :meth:`take` hands out what arrived.

    Activations carry a header (dtype and shape) the first time a (link, transfer) slot is used
    with a batch signature; afterwards both sides know the shape and only the data travels.
    Gradients never carry one: the receiver is the producer and knows the shape it sent
    (``gradient_like(key)``). A message to oneself goes straight into the stash. On ``ragged``
    links (tokens of ragged items, padded per microbatch) every microbatch carries its header.
    """

    def __init__(self, group, rank: int, messages: list, headers: dict, device: torch.device, gradient_like,
                 ragged: frozenset[int] = frozenset()):
        self.group, self.rank, self.device = group, rank, device
        self.messages, self.posted = messages, 0
        self.sent_headers = headers.setdefault("sent", set())
        self.shapes = headers.setdefault("received", {})
        self.gradient_like = gradient_like
        self.ragged = ragged
        self.outgoing: dict = {}
        self.stash: dict = {}
        self.receiving: list = []  # posted groups with receives, not yet waited for
        self.sending: list = []  # posted groups of sends only, waited for at close

    def send(self, key, tensor: torch.Tensor, dst: int) -> None:
        """Hand over a message; it leaves when :meth:`post` reaches it."""
        if dst == self.rank:
            self.stash[key] = tensor
        else:
            self.outgoing[key] = tensor.contiguous()

    def post(self, upto: int, wait: bool = False) -> None:
        """Post the messages before position ``upto`` as one group (split where a header must
        arrive before its data can be received); with ``wait``, wait for every posted receive."""
        ops, receives = [], False
        while self.posted < upto:
            message = self.messages[self.posted]
            if message.send:
                ops += self._send_ops(message)
            else:
                shape = self._known_shape(message.key)
                if shape is None:  # the header now, then this message again
                    header = self.shapes[self._slot(message.key)] = torch.empty(_HEADER, dtype=torch.int64,
                                                                           device=self.device)
                    self._post(ops + [dist.P2POp(dist.irecv, header, message.peer, self.group)], True)
                    self._wait()
                    ops, receives = [], False
                    continue
                buffer = self.stash[message.key] = torch.empty(shape[0], dtype=shape[1], device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, message.peer, self.group))
                receives = True
            self.posted += 1
        self._post(ops, receives)
        if wait:
            self._wait()

    def take(self, key, src: int) -> torch.Tensor:
        """The message ``key`` from ``src`` (posted and waited for, or sent to oneself)."""
        if key not in self.stash:
            raise RuntimeError(f"rank {self.rank} expects message {key} from rank {src}, which the plan does "
                               "not receive before this operation")
        return self.stash.pop(key)

    def close(self) -> None:
        """Post the rest, wait for everything, then let go of the group (a closed group can be
        destroyed)."""
        self.post(len(self.messages), wait=True)
        for works, _ in self.sending:
            for work in works:
                work.wait()
        self.sending.clear()
        self.group = self.gradient_like = None

    def drop(self) -> None:
        """Forget every message and the group (after a failure: nothing may keep the group alive)."""
        self.receiving.clear()
        self.sending.clear()
        self.outgoing.clear()
        self.stash.clear()
        self.group = self.gradient_like = None

    def _send_ops(self, message) -> list[dist.P2POp]:
        tensor = self.outgoing.pop(message.key)
        slot = self._slot(message.key)
        ops = []
        if slot is not None and slot not in self.sent_headers:
            self.sent_headers.add(slot)
            ops.append(dist.P2POp(dist.isend, _header(tensor), message.peer, self.group))
        return ops + [dist.P2POp(dist.isend, tensor, message.peer, self.group)]

    def _known_shape(self, key):
        slot = self._slot(key)
        if slot is None:
            like = self.gradient_like(key)
            return like.shape, like.dtype
        known = self.shapes.get(slot)
        if isinstance(known, torch.Tensor):  # its header arrived
            known = self.shapes[slot] = (_shape(known), _DTYPES[int(known[0])])
        return known

    def _slot(self, key) -> tuple[int, ...] | None:
        """Where an activation's header is remembered: its (link, transfer), with the microbatch
        on a ragged link; None for a gradient."""
        kind, link, microbatch, transfer = key
        if kind != "act":
            return None
        return (link, transfer, microbatch) if link in self.ragged else (link, transfer)

    def _post(self, ops: list[dist.P2POp], receives: bool) -> None:
        if ops:
            works = dist.batch_isend_irecv(ops)
            (self.receiving if receives else self.sending).append((works, ops))  # the tensors stay alive

    def _wait(self) -> None:
        for works, _ in self.receiving:
            for work in works:
                work.wait()
        self.receiving.clear()



