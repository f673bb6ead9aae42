"""``run --save DIR --resume``: one command that starts a job and, run again, continues it."""

import pathlib

from cli_in_process import main_in_process as _main
from cli_in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ("run", "graphs/mamba_lm.yaml", "--nproc", "1", "--batch-size", "4", "--log-interval", "1")


def _losses(stdout: str) -> dict[int, str]:
    return {int(line.split("|")[0].split()[1].split("/")[0]): line.split("|")[1].split()[1]
            for line in stdout.splitlines() if line.startswith("step")}


def test_the_same_command_starts_then_resumes_from_the_latest_step(tmp_path, capfd):
    root = tmp_path / "ckpt"
    first = run_in_process(capfd, *RUN, "--steps", "2", "--save", str(root), "--resume",
                           "--save-interval-minutes", "0.0001")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"--resume: no checkpoint yet under {root}; starting at step 1" in first.stdout
    # 6 ms between saves: each step saves by wall time (without it, only the last step would)
    assert f"saved step 1 to {root}/step_0000001" in first.stdout, first.stdout
    second = run_in_process(capfd, *RUN, "--steps", "4", "--save", str(root), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"--resume: a checkpoint under {root}; resuming from its latest step" in second.stdout
    assert f"resumed from {root} at step 2" in second.stdout
    assert list(_losses(first.stdout)) == [1, 2] and list(_losses(second.stdout)) == [3, 4]
    # that a resumed run continues exactly is checked with a straight run in test_preemption.py
    assert (root / "latest").read_text().strip() == "step_0000004"

    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "graphs/mamba_lm.yaml").read_text().replace("hidden_size: 64", "hidden_size: 32"))
    refused = _main("run", str(other), "--steps", "6", "--save", str(root), "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "node 'lm'" in refused.stderr, refused.stderr


def test_resume_mistakes_are_named_before_any_rank_starts(tmp_path):
    alone = _main(*RUN, "--steps", "2", "--resume")
    assert alone.returncode == 2 and "--resume needs --save DIR" in alone.stderr
    both = _main(*RUN, "--steps", "2", "--save", str(tmp_path), "--load", str(tmp_path), "--resume")
    assert both.returncode == 2 and "--resume and --load both name where to start" in both.stderr


def test_save_interval_minutes_mistakes_are_named(tmp_path):
    zero = _main(*RUN, "--steps", "2", "--save", str(tmp_path), "--save-interval-minutes", "0")
    assert zero.returncode == 2 and "--save-interval-minutes: must be a number above 0" in zero.stderr
    alone = _main(*RUN, "--steps", "2", "--save-interval-minutes", "5")
    assert alone.returncode == 2 and "--save-interval-minutes, --save-frozen and --async-save need --save DIR" in alone.stderr
