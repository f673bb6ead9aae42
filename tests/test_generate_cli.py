"""``mimo-builder generate FILE --load DIR --data MODULE:FUNCTION``: answers from a checkpoint on
the ranks it was saved on, one line per sample with its reference answer, then the share right;
bad options and a missing checkpoint are named before any rank starts."""

import re
import subprocess
import sys
from pathlib import Path

from cli_in_process import ROOT, main_in_process

CLI = Path(sys.executable).parent / "mimo-builder"
DIGITS = ["--allow", "examples"]


def _cli(*args):
    return subprocess.run([str(CLI), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_generate_answers_the_prompts_of_a_dataset(tmp_path):
    ckpt = tmp_path / "ckpt"
    # on one rank (--colocate): the 4-rank placement's generation is checked in tests/test_generate.py
    # in this process (the launcher's lines are what is checked; ranks fork from this worker's
    # server): the subprocess below runs the command as typed
    trained = main_in_process(*DIGITS, "run", "examples/digits_sum.yaml", "--colocate", "--nproc", "1", "--steps",
                              "12", "--batch-size", "8", "--data", "examples.digits_sum:train_data", "--save", str(ckpt))
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = main_in_process(*DIGITS, "generate", "examples/digits_sum.yaml", "--colocate", "--nproc", "1",
                             "--load", str(ckpt), "--data", "examples.digits_sum:held_out_data", "--samples", "3",
                             "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [re.match(r"sample (\d+): prompt '<image>\+<audio>=' -> '.*' \(answer '\d\+\d=\d+'\)$", line).group(1)
            for line in lines[:3]] == ["0", "1", "2"], lines
    assert re.fullmatch(r"exact match: \d+\.\d% of 3 samples", lines[3]), lines

    # one prompt with an image file and a clip's features, tags added before the text
    from PIL import Image
    import numpy as np

    Image.fromarray((np.arange(144).reshape(12, 12) % 255).astype(np.uint8)).save(tmp_path / "digit.png")
    np.save(tmp_path / "tone.npy", np.zeros((4, 16), dtype=np.float32))
    one = _cli(*DIGITS, "generate", "examples/digits_sum.yaml", "--colocate", "--nproc", "1", "--load", str(ckpt),
               "--prompt", "+<audio>=", "--image", str(tmp_path / "digit.png"), "--audio", str(tmp_path / "tone.npy"),
               "--max-new-tokens", "6")
    assert one.returncode == 0, one.stderr[-2000:]
    assert re.fullmatch(r"sample 0: prompt '<image>\\n\+<audio>=' -> '.*'", one.stdout.strip()), one.stdout


def test_bad_generation_requests_are_named_before_any_rank(tmp_path):
    for args, message in ((["--load", str(tmp_path / "none")], "no checkpoint at"),
                          (["--load", str(tmp_path), "--image", "x.png"], "--image, --audio and --chat go with --prompt"),
                          (["--load", str(tmp_path), "--temperature", "nan"], "temperature: nan; it must be finite"),
                          (["--load", str(tmp_path), "--temperature", "-1"], "temperature: -1.0")):
        result = main_in_process(*DIGITS, "generate", "examples/digits_sum.yaml", "--data",
                                 "examples.digits_sum:held_out_data", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result
