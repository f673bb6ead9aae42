"""``run --eval-interval N``: the held-out set evaluated every N steps, without changing training."""

import pathlib

import pytest
from cli_in_process import main_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


def _train(eval_interval):
    from graphs.mamba_lm import mamba_lm
    from mimo_builder._internal.kinds.registry import allowed_prefixes
    from mimo_builder._internal.platform.launch import launch
    from mimo_builder._internal.runtime.train import TrainOptions, train

    options = TrainOptions(steps=4, batch_size=4, data=f"{DATA}:train", eval_data=f"{DATA}:held_out",
                           eval_interval=eval_interval, allowed_modules=(*allowed_prefixes(), DATA),
                           import_roots=(str(ROOT),))
    return launch(train, 1, mamba_lm(), options)[0]


@pytest.mark.slow
def test_evaluating_every_two_steps_prints_each_and_trains_the_same(capfd):
    plain = _train(None)
    capfd.readouterr()
    evaluated = _train(2)
    out = capfd.readouterr().out
    assert evaluated == plain  # the same floats: evaluation neither steps nor draws random numbers
    assert "held-out before training: lm.loss " in out and "held-out after training: lm.loss " in out
    assert "held-out at step 2: lm.loss " in out and "(8 samples)" in out
    assert "held-out at step 4" not in out  # the last step's is "after training"
