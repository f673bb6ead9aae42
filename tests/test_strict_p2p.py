"""NCCL's point-to-point rules on gloo (``MIMO_BUILDER_P2P=strict``) and a step order that keeps them.

The emulation bites: two ranks that each send before they receive pass on plain gloo and are
refused under strict mode; a rank's operations complete in issue order (plain gloo lets a later
receive finish first); a ``batch_isend_irecv`` group progresses as one. (A blocking gloo send
already waits for its receive, so rendezvous needs no test of its own.) The
runtime's posting order (:mod:`mimo_builder._internal.runtime.posting`) is replayed under NCCL's rules
without processes, for the shipped graphs and the pipeline tests' shapes: every step completes,
while the order it replaced (each operation's sends on their own) deadlocks on a VP schedule.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from mimo_builder._internal.platform.launch import RankError, launch

@pytest.fixture
def strict(monkeypatch):
    """Strict P2P with a timeout no loaded machine reaches in a pattern that completes."""
    monkeypatch.setenv("MIMO_BUILDER_P2P", "strict")
    monkeypatch.setenv("MIMO_BUILDER_P2P_TIMEOUT", "30")


@pytest.fixture
def strict_bite(monkeypatch):
    """Strict P2P with a short timeout, for the pattern that never completes."""
    monkeypatch.setenv("MIMO_BUILDER_P2P", "strict")
    monkeypatch.setenv("MIMO_BUILDER_P2P_TIMEOUT", "3")


def _crossing():
    """Both ranks send first, then receive: fine on gloo, a deadlock on NCCL."""
    rank = dist.get_rank()
    work = dist.isend(torch.full((4,), float(rank)), 1 - rank)
    got = torch.empty(4)
    dist.recv(got, 1 - rank)
    work.wait()
    return got.tolist()


def test_a_crossing_pattern_passes_on_plain_gloo(monkeypatch):
    monkeypatch.delenv("MIMO_BUILDER_P2P", raising=False)
    assert launch(_crossing, 2, timeout_s=60) == [[1.0] * 4, [0.0] * 4]


def test_a_crossing_pattern_is_refused_under_strict_p2p(strict_bite, capsys):
    with pytest.raises(RankError) as err:
        launch(_crossing, 2, timeout_s=60)
    assert "strict P2P: rank 0's send of 16 bytes to rank 1 found no matching receive in 3 s" in err.value.trace \
        or "strict P2P: rank 1's send of 16 bytes to rank 0 found no matching receive in 3 s" in err.value.trace
    assert "strict P2P" in capsys.readouterr().err  # the run says it runs under the emulation


def _issue_order():
    """Rank 0 sends to rank 1 (posted late), then receives from rank 2 (sent at once): under
    NCCL's rules the receive cannot complete before the earlier send."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    if rank == 0:
        send = dist.isend(torch.ones(2), 1)
        dist.recv(torch.empty(2), 2)
        after_the_send = store.check(["late"])
        send.wait()
        return after_the_send
    if rank == 1:
        time.sleep(0.5)
        store.set("late", "1")
        dist.recv(torch.empty(2), 0)
    else:
        dist.send(torch.ones(2), 0)
    return True


def test_a_rank_completes_its_operations_in_issue_order(strict):
    assert launch(_issue_order, 3, timeout_s=60)[0] is True


def test_plain_gloo_completes_a_later_receive_first(monkeypatch):
    monkeypatch.delenv("MIMO_BUILDER_P2P", raising=False)
    assert launch(_issue_order, 3, timeout_s=60)[0] is False  # what strict mode changes


def _batched_crossing():
    """The crossing pattern as one group per rank (MCore's send_forward_recv_backward)."""
    rank = dist.get_rank()
    got = torch.empty(4)
    ops = [dist.P2POp(dist.isend, torch.full((4,), float(rank)), 1 - rank), dist.P2POp(dist.irecv, got, 1 - rank)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return got.tolist()


def test_a_batch_is_one_group_under_strict_p2p(strict):
    assert launch(_batched_crossing, 2, timeout_s=60) == [[1.0] * 4, [0.0] * 4]


def test_an_unknown_mode_is_a_named_error(monkeypatch):
    from mimo_builder._internal.errors import ConfigError

    monkeypatch.setenv("MIMO_BUILDER_P2P", "strcit")
    with pytest.raises(ConfigError, match="MIMO_BUILDER_P2P='strcit': the only mode is 'strict'"):
        launch(_crossing, 2)


# --- the step's posting order, replayed under NCCL's rules (no processes) ------------------------

def _replay(points: dict[int, list[tuple[list, bool]]]) -> list[int]:
    """NCCL's rules: each rank's host posts groups in order and, at a point that waits, blocks
    until its queue is done; its queue runs one group at a time; a message completes when the
    groups holding both its ends are current; a group when all its messages have. Returns the
    ranks left waiting (empty when the step completes)."""
    host = dict.fromkeys(points, 0)
    queues = {r: [] for r in points}
    head = dict.fromkeys(points, 0)
    done: set = set()
    while True:
        moved = False
        for r, steps in points.items():  # hosts post until they must wait
            while host[r] < len(steps):
                group, waits = steps[host[r]]
                if waits and head[r] < len(queues[r]):
                    break
                if group:
                    queues[r].append(group)
                host[r] += 1
                moved = True
                if waits:
                    break
        current = {r: queues[r][head[r]] for r in points if head[r] < len(queues[r])}
        count: dict = {}
        for group in current.values():
            for key in group:
                count[key] = count.get(key, 0) + 1
        done |= {key for key, n in count.items() if n == 2}
        for r, group in current.items():
            if all(key in done for key in group):
                head[r] += 1
                moved = True
        if not moved:
            return sorted(r for r in points if host[r] < len(points[r]) or head[r] < len(queues[r]))


def _posting_points(posting, rank: int) -> list[tuple[list, bool]]:
    """What the runtime posts on ``rank``: per operation, up to ``by_start`` (then waits) and up
    to ``by_end``; the rest at the end."""
    keys = [m.key for m in posting.messages[rank]]
    points, posted = [], 0
    for start, end in zip(posting.by_start[rank], posting.by_end[rank]):
        points += [(keys[posted:start], True), (keys[start:end], False)]
        posted = end
    return points + [(keys[posted:], True)]


def _lone_sends_points(plan, routes, rank: int, forward_only: bool) -> list[tuple[list, bool]]:
    """The order the posting plan replaced: receives at each operation's start, its sends as a
    group of their own at its end."""
    from mimo_builder._internal.runtime import posting as p

    points = []
    for op in p.rank_ops(plan, rank, forward_only):
        points.append(([key for key, src in p._needed(op, rank, routes) if src != rank], True))
        points.append(([key for key, _ in p._sends(op, rank, routes, forward_only)], False))
    return points


def _shapes():
    """(name, validated graph) of the shipped graphs and the pipeline tests' placements."""
    import test_pipeline

    from mimo_builder._internal.kinds.loading import load_graph
    from mimo_builder._internal.validation import validate_graph

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shapes = [(f"{name}@4", validate_graph(load_graph(os.path.join(root, name)), 4))
              for name in ("graphs/vlm.yaml", "graphs/avlm.yaml", "examples/digits_sum.yaml")]
    shapes += [(kind, validate_graph(test_pipeline._graph(kind, True), 4 if kind in ("encoders", "diamond") else 2))
               for kind in ("pp2", "vp2", "encoders", "diamond")]
    return shapes


@pytest.fixture(scope="module")
def shapes():
    return _shapes()


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 8])
def test_every_step_completes_under_nccls_rules(shapes, microbatches, forward_only):
    from mimo_builder._internal.runtime.pipeline import needs_grad, plan_graph
    from mimo_builder._internal.runtime.posting import posting_plan
    from mimo_builder._internal.runtime.routes import Routes

    for name, valid in shapes:
        plan = plan_graph(valid, microbatches)
        routes = Routes(plan, valid.edges, valid.layouts, needs_grad(valid), 8 * microbatches)
        posting = posting_plan(plan, routes, forward_only)
        assert _replay({r: _posting_points(posting, r) for r in plan.order}) == [], name


def test_the_replay_finds_the_deadlock_of_lone_sends(shapes):
    """The replay can fail: posting each operation's sends on their own deadlocks the VP
    schedule (the strict run of the pipeline tests found it first)."""
    from mimo_builder._internal.runtime.pipeline import needs_grad, plan_graph
    from mimo_builder._internal.runtime.routes import Routes

    valid = dict(shapes)["vp2"]
    plan = plan_graph(valid, 3)
    routes = Routes(plan, valid.edges, valid.layouts, needs_grad(valid), 24)
    assert _replay({r: _lone_sends_points(plan, routes, r, False) for r in plan.order}) == [0, 1]
