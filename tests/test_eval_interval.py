"""``run --eval-interval N``: the held-out set evaluated every N steps, without changing training."""

import pytest
from cli_in_process import main_in_process, run_in_process

DATA = "tests.digit_sums"


def test_eval_interval_without_eval_data_is_a_usage_error_before_any_rank_starts():
    result = main_in_process("run", "graphs/mamba_lm.yaml", "--steps", "2", "--eval-interval", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: --eval-interval evaluates the held-out set during training: give one with --eval-data" \
        in result.stderr
    assert "rank" not in result.stdout


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_eval_interval_is_a_positive_integer(value):
    result = main_in_process("run", "graphs/mamba_lm.yaml", "--eval-data", f"{DATA}:held_out", "--eval-interval", value)
    assert result.returncode == 2 and f"--eval-interval: must be a positive integer, got '{value}'" in result.stderr


def _run(capfd, *extra: str) -> tuple[list[str], str]:
    """``mimo-builder run`` with the ranks' lines in its output; the step lines' losses and the
    whole output."""
    args = ["--allow", "tests", "run", "graphs/mamba_lm.yaml", "--steps", "4", "--batch-size", "4",
            "--data", f"{DATA}:train", "--eval-data", f"{DATA}:held_out", "--log-interval", "1", *extra]
    result = run_in_process(capfd, *args)
    assert result.returncode == 0, result.stderr
    losses = [line.split("|")[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    return losses, result.stdout


@pytest.mark.slow
def test_evaluating_every_two_steps_prints_each_and_trains_the_same(capfd):
    plain, _ = _run(capfd)
    evaluated, out = _run(capfd, "--eval-interval", "2")
    assert len(plain) == 4 and evaluated == plain  # evaluation neither steps nor draws random numbers
    assert "held-out before training: lm.loss " in out and "held-out after training: lm.loss " in out
    assert "held-out at step 2: lm.loss " in out and "(8 samples)" in out
    assert "held-out at step 4" not in out  # the last step's is "after training"
