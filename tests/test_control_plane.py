"""The step guard's load on the job's store: bounded per step, whatever the schedule's operations.

- a real 2-rank run, its guard's real store client wrapped in a counter: the requests the main
  thread makes per step are the same at 1 and at 4 microbatches (none: a note stays in memory),
  and the watchdog makes at most two per poll;
- the poll interval grows with the world so that the job's polls stay within the budget;
- a rank's note board is read back on its host, and only as its own;
- the benchmark's largest world follows from the capacity and the interval.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from multirank import run_ranks  # noqa: E402
from store_counting import count_rank  # noqa: E402


def test_a_ranks_store_requests_per_step_do_not_grow_with_its_operations():
    for rank, by_m in enumerate(run_ranks(2, count_rank, "colocated_dp2", (1, 4), 3)):
        one, four = by_m[1], by_m[4]
        assert one["main_per_step"] == four["main_per_step"] <= 1, (rank, one["main_kinds"], four["main_kinds"])
        for c in (one, four):
            assert c["watchdog_per_poll"] <= 2, (rank, c["watchdog_kinds"])
            polls = c["watchdog_kinds"].get("set", 0)
            assert polls <= c["elapsed_s"] / c["interval_s"] + 2, (rank, c)


def test_the_poll_interval_keeps_the_jobs_polls_within_the_budget_up_to_its_longest():
    from mimo_builder._internal.runtime.guard import MAX_POLL_S, POLLS_PER_S, poll_interval_s

    assert poll_interval_s(2) == poll_interval_s(POLLS_PER_S // 2) == 0.5
    for world in (4096, 16384):
        assert world / poll_interval_s(world) <= POLLS_PER_S
    assert poll_interval_s(10 * POLLS_PER_S * int(MAX_POLL_S)) == MAX_POLL_S


def test_a_note_board_is_read_on_its_host_and_only_as_its_owners():
    from mimo_builder._internal.runtime.board import NoteBoard, read_note

    board = NoteBoard("guard/a|1")
    try:
        board.write("2|0|node 'lm' forward (microbatch 0)")
        assert read_note(board.address, "guard/a|1") == "2|0|node 'lm' forward (microbatch 0)"
        assert read_note(board.address, "guard/b|1") is None  # a reused pid or fd: someone else's
        assert read_note("another-host" + board.address[board.address.index(":"):], "guard/a|1") is None
        board.write("x" * 10_000)  # cut to fit
        assert read_note(board.address, "guard/a|1").startswith("xxx")
    finally:
        board.close()
    assert read_note(board.address, "guard/a|1") is None


def test_the_largest_world_follows_from_the_capacity_and_the_interval():
    from bench_control_plane import largest_world, steady_rate
    from mimo_builder._internal.runtime.guard import MAX_POLL_S, POLLS_PER_S

    capacity = 20_000.0  # above the budget's 2 x POLLS_PER_S: only the longest interval limits
    world = largest_world(capacity, per_step=0.0, per_poll=2.0)
    assert world == int(capacity * MAX_POLL_S / 2) > POLLS_PER_S * MAX_POLL_S
    assert steady_rate(world + 1, 0.0, 2.0) > capacity >= steady_rate(world, 0.0, 2.0)
    assert largest_world(capacity, per_step=31.0, per_poll=2.0) < 1000  # a request per operation
