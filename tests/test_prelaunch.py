"""Misuse of ``run`` named before any rank starts (exit 2, no traceback): the data module and
its first sample, the batch split, and the checkpoints ``--load`` and ``init:`` name."""

import pytest
import yaml

from cli_in_process import ROOT, main_in_process

VLM = str(ROOT / "graphs" / "vlm.yaml")


def _run(*args):
    result = main_in_process("--allow", "tests.bad_data", "run", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert "step 1" not in result.stdout, result.stdout  # no rank trained
    return result.stderr


@pytest.mark.parametrize("name, expected", [
    ("factory_raises", "--data: tests.bad_data:factory_raises() raised ValueError: no such split"),
    ("item_raises", "--data: reading sample 0 raised RuntimeError: the shard is gone"),
    ("string_pixels", "sample 0['pixel_values'] is of type str, not an array of numbers"),
    ("integer_answer", "sample 0['answer'] is of type int, not text (str)"),
    ("nan_pixels", "batch['pixel_values'] for vision.pixel_values: 6144 of 6144 values are not finite"),
    ("integer_pixels", "expected a floating tensor (torch.float32), found torch.int64"),
    ("small_image", "an image of 12 x 16 pixels: height and width must be multiples of patch_size 8 from 8 to 32"),
])
def test_a_data_module_and_its_first_sample_are_checked_before_any_rank(name, expected):
    stderr = _run(VLM, "--nproc", "4", "--steps", "1", "--data", f"tests.bad_data:{name}")
    assert expected in stderr, stderr


def test_a_data_module_that_does_not_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_data_module.py").write_text("def broken(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = main_in_process("--allow", "broken_data_module", "run", VLM, "--nproc", "4",
                             "--data", "broken_data_module:data")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--data: importing 'broken_data_module' raised SyntaxError: invalid syntax" in result.stderr


@pytest.mark.parametrize("batch, microbatches, expected", [
    ("7", "2", "batch size 7 is not divisible by 2 microbatch(es)"),
    ("6", "2", "microbatch size 3 (batch size 6 / 2 microbatches) is not divisible by node 'vision' "
               "data-parallel size 2"),
])
def test_a_batch_that_does_not_split_is_named_by_its_flags(batch, microbatches, expected):
    stderr = _run(VLM, "--nproc", "4", "--steps", "1", "--batch-size", batch, "--microbatches", microbatches)
    assert "--batch-size / --microbatches:" in stderr and expected in stderr, stderr


def test_a_run_shorter_than_its_warmup_is_named_by_node():
    stderr = _run(str(ROOT / "examples" / "digits_sum.yaml"), "--allow", "examples", "--nproc", "4", "--steps", "2")
    assert "node 'lm': the run's 2 steps must exceed optimizer.warmup_steps (10)" in stderr, stderr
