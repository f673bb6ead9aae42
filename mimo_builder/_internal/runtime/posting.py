"""When each rank posts its point-to-point messages, so that NCCL's rules cannot deadlock a step.

On NCCL a send completes only once its receiver has posted the receive, and a rank's sends and
receives complete in the order it issued them. So every message of a step gets one place in a
global order, the same on every rank: the simulated time its producer finishes it (from
:func:`~mimo_builder._internal.runtime.pipeline.plan_pipeline`), then its key. Each rank posts its own
sends and receives in that order, as early as it can: at the start of an operation, every
receive due by then (produced no later than the operation starts) and every send already
produced, stopping at the first send still to be produced; at the end of an operation, the same
with the end's time. An operation then waits only for receives that are due.

Why nothing waits forever: take the earliest message in the order that is not complete. Both
of its ranks have completed everything before it. Its producer reaches the end of the operation
that makes it, since anything that operation waits for is due earlier, so complete, and posts
it there; its consumer posts it no later than the start of the operation that needs it, and
whatever it waits for before is earlier in the order, so complete. Both ends post it, and
nothing earlier holds either of them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimo_builder._internal.runtime.pipeline import FORWARD, Op, PipelinePlan
from mimo_builder._internal.runtime.routes import ACTIVATION, Key, Routes


@dataclass(frozen=True)
class Message:
    """One point-to-point message of a rank: ``send`` to ``peer``, or received from it."""

    key: Key
    peer: int
    send: bool


@dataclass
class Posting:
    """Per rank: its messages in the step's global order, and for each of its operations how
    many of them are posted by the operation's start and by its end (prefix lengths)."""

    messages: dict[int, list[Message]] = field(default_factory=dict)
    by_start: dict[int, list[int]] = field(default_factory=dict)
    by_end: dict[int, list[int]] = field(default_factory=dict)


def rank_ops(plan: PipelinePlan, rank: int, forward_only: bool) -> list[Op]:
    """The operations ``rank`` runs (forward only: its forwards)."""
    return [op for op in plan.order.get(rank, []) if op.kind == FORWARD or not forward_only]


def posting_plan(plan: PipelinePlan, routes: Routes, forward_only: bool = False) -> Posting:
    """Every rank's messages in global order and its posting points (see the module)."""
    produced = _production_times(plan, routes, forward_only)
    posting = Posting()
    for rank in plan.order:
        ops = rank_ops(plan, rank, forward_only)
        made_by = {}  # a send -> the index of the operation that produces it
        sends, receives = [], []
        for i, op in enumerate(ops):
            for key, dst in _sends(op, rank, routes, forward_only):
                sends.append(Message(key, dst, True))
                made_by[key] = i
            for key, src in _needed(op, rank, routes):
                if src != rank:
                    receives.append(Message(key, src, False))
        messages = sorted(sends + receives, key=lambda m: (produced[m.key], m.key))
        posting.messages[rank] = messages
        posting.by_start[rank] = [_prefix(messages, produced, made_by, op.start, i) for i, op in enumerate(ops)]
        posting.by_end[rank] = [_prefix(messages, produced, made_by, op.end, i + 1)
                                for i, op in enumerate(ops)]
    return posting


def _prefix(messages: list[Message], produced: dict, made_by: dict, now: float, done_ops: int) -> int:
    """How many messages can be posted at time ``now``, after ``done_ops`` operations ran: stop
    at the first receive not due yet or send not made yet."""
    for n, message in enumerate(messages):
        ready = made_by[message.key] < done_ops if message.send else produced[message.key] <= now
        if not ready:
            return n
    return len(messages)


def _production_times(plan: PipelinePlan, routes: Routes, forward_only: bool) -> dict[Key, float]:
    """Each message's place in the order: when its producing operation ends in the simulation."""
    out = {}
    for rank in plan.order:
        for op in rank_ops(plan, rank, forward_only):
            for key, _ in _sends(op, rank, routes, forward_only):
                out[key] = op.end
    return out


def _sends(op: Op, rank: int, routes: Routes, forward_only: bool):
    """(key, destination) of what ``op`` sends to other ranks."""
    if forward_only and op.kind != FORWARD:
        return
    for key, t in routes.sends(op, rank):
        dst = t.dst if key[0] == ACTIVATION else t.src
        if dst != rank:
            yield key, dst


def _needed(op: Op, rank: int, routes: Routes):
    """(key, source) of what ``op`` takes, in the order the step takes it."""
    if op.kind == FORWARD:
        for li in routes.in_links[op.stage]:
            for key, t in routes.receives(op, rank, li):
                yield key, t.src
    else:
        for li in routes.out_links[op.stage]:
            for key, t in routes.receives(op, rank, li):
                yield key, t.dst
