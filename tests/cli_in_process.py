"""``mimo-builder ARGS`` in the test process: the same ``main()`` with stdout and stderr
captured, for commands that start no ranks (it saves the seconds a new interpreter spends
importing Megatron). Rank output goes to the ranks' own file descriptors, so ``run`` commands
that train are tested as a user runs them, in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_in_process(*args) -> subprocess.CompletedProcess:
    """Run the command from the repository root; returns its exit code and output."""
    from mimo_builder.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
