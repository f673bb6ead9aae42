"""Watching training: phase timers, the printed summaries, the progress bar and TensorBoard files.

The multi-rank path (timings gathered from every rank of a real run, TensorBoard written by
``mimo-builder run --tensorboard``) is covered in ``test_cli.py``; these check the parts alone.
"""

import io
import time

import pytest

from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.runtime import monitor
from mimo_builder._internal.runtime.monitor import StepRecord, TrainingMonitor, auto_log_interval, summary_lines
from mimo_builder._internal.runtime.timing import PhaseTimer, slowest_per_node


def test_a_phase_timer_adds_up_the_blocks_of_a_node_and_starts_again_after_take():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.measure("vision", "forward"):
            time.sleep(0.02)
    with timer.measure("lm", "backward"):
        pass
    seconds = timer.take()
    assert set(seconds) == {("vision", "forward"), ("lm", "backward")}
    assert 0.04 <= seconds[("vision", "forward")] < 0.5
    assert seconds[("lm", "backward")] < 0.02
    assert timer.take() == {}


def test_a_phase_timer_counts_a_block_that_raised():
    timer = PhaseTimer()
    with pytest.raises(ValueError), timer.measure("lm", "forward"):
        time.sleep(0.01)
        raise ValueError("boom")
    assert timer.take()[("lm", "forward")] >= 0.01


def test_each_node_takes_its_slowest_rank_per_phase_in_graph_order():
    rank0 = {("vision", "forward"): 0.25, ("vision", "communication"): 0.5}
    rank1 = {("vision", "forward"): 0.75, ("lm", "backward"): 2.0}
    nodes = slowest_per_node([rank0, rank1], order=["vision", "projector", "lm"])
    assert list(nodes) == ["vision", "lm"]
    assert nodes["vision"] == {"forward": 0.75, "backward": 0.0, "communication": 0.5, "optimizer": 0.0}
    assert nodes["lm"]["backward"] == 2.0


def _record(step, loss=2.0, grad_norm=1.0, seconds=0.5, **kw):
    times = {"lm": {"forward": 0.1, "backward": 0.2, "communication": 0.03, "optimizer": 0.04}}
    return StepRecord(step, loss, grad_norm, tokens=1000, seconds=seconds, node_seconds=times, **kw)


def test_a_summary_gives_means_over_the_interval_and_the_node_split_in_milliseconds():
    lines = summary_lines([_record(9, loss=3.0, grad_norm=2.0, seconds=0.25),
                           _record(10, loss=1.0, grad_norm=4.0, seconds=0.75)], last_step=100)
    # loss (3+1)/2, grad norm (2+4)/2, 2,000 tokens in 1 s, 500 ms per step
    assert lines[0] == "step  10/100 | loss  2.0000 | grad norm   3.000 |     2000 tokens/s |    500 ms"
    assert lines[1] == "    ms per step fwd/bwd/comm/opt: lm 100/200/30/40"


def test_a_summary_names_skipped_steps_and_ignores_their_loss():
    lines = summary_lines([_record(1, loss=float("nan"), skipped=True, nonfinite_nodes=("vision",)),
                           _record(2, loss=4.0)], last_step=2)
    assert "loss  4.0000" in lines[0] and lines[0].endswith("| skipped 1 steps: non-finite vision")


def test_the_monitor_prints_at_the_interval_and_at_the_last_step():
    out = io.StringIO()
    with TrainingMonitor(first_step=1, last_step=7, log_interval=3, stream=out) as watch:
        for step in range(1, 8):
            watch.record(_record(step, loss=float(step)))
    steps = [line.split("|")[0].split()[1] for line in out.getvalue().splitlines() if line.startswith("step")]
    assert steps == ["3/7", "6/7", "7/7"]
    assert "loss  5.0000" in out.getvalue().splitlines()[2]  # steps 4-6


def test_with_the_nodes_work_each_summary_adds_their_throughput_over_the_interval():
    from mimo_builder._internal.runtime.throughput import NodeWork

    work = {"lm": NodeWork(ranks=2, tokens=500, flops=4e12, peak=1e13, reads_tokens=True)}
    out = io.StringIO()
    with TrainingMonitor(first_step=1, last_step=2, log_interval=2, stream=out, work=work, world_size=2) as watch:
        watch.record(_record(1, seconds=0.25))
        watch.record(_record(2, seconds=0.75))
    # 1,000 batch tokens a step (twice the planned 500: twice the FLOPs), 0.5 s a step on 2 ranks
    assert out.getvalue().splitlines()[-1] == ("    throughput (MFU 80.0%): lm 8 TFLOP/s/rank, MFU 80.0%, "
                                               "2,000 tokens/s")


def test_about_fifty_lines_per_run_by_default():
    assert [auto_log_interval(n) for n in (1, 20, 50, 51, 1000, 100_000)] == [1, 1, 1, 2, 20, 2000]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_progress_bar_shows_the_step_and_goes_away_at_the_end():
    out = _Terminal()
    with TrainingMonitor(first_step=1, last_step=4, log_interval=2, stream=out) as watch:
        for step in range(1, 5):
            watch.record(_record(step))
            time.sleep(0.15)  # the bar refreshes ten times a second
    text = out.getvalue()
    assert "step 4/4" in text and "ms per step" in text
    assert "eta" in text and "━" in text  # the bar was drawn while running


def test_tensorboard_receives_every_step_with_the_node_split(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TrainingMonitor(first_step=1, last_step=3, log_interval=10, tensorboard=str(tmp_path),
                         stream=io.StringIO()) as watch:
        for step in range(1, 4):
            watch.record(_record(step, loss=float(step), learning_rates={"lm": 1e-3 * step}))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [round(e.value, 3) for e in events.Scalars("train/tokens_per_s")] == [2000.0] * 3
    assert [round(e.value, 6) for e in events.Scalars("lr/lm")] == [0.001, 0.002, 0.003]
    assert round(events.Scalars("time_ms/lm/backward")[0].value, 3) == 200.0


def test_tensorboard_without_the_package_is_a_named_error(monkeypatch):
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"--tensorboard needs the 'tensorboard' package: pip install"):
        monitor.check_tensorboard()
