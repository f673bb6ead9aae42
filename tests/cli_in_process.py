"""``mimo-builder ARGS`` in the test process: the same ``main()`` with stdout and stderr
captured (it saves the seconds a new interpreter spends importing Megatron, and a fork server's
import). ``run_in_process`` also captures what the ranks print. What only a process shows (the
installed script, signals to the launcher, torchrun) is tested in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_in_process(*args) -> subprocess.CompletedProcess:
    """Run the command from the repository root; returns its exit code and output."""
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _exit_code(args)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _exit_code(args) -> int:
    """``main(args)``'s exit code, argparse's usage errors (SystemExit) included."""
    from mimo_builder.cli import main

    try:
        return main(list(args))
    except SystemExit as exit_:
        return exit_.code


def run_in_process(capfd, *args, cwd: os.PathLike | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command that starts ranks, in the test process: ``main_in_process`` with the ranks' output
    too. Ranks write where the launcher's stdout and stderr descriptors point (pytest's ``capfd``
    captures them), so their lines come back in order with the launcher's. ``cwd`` (the repository
    root by default) and ``env`` hold for the call only; modules the command imported from
    ``cwd`` (a user's data module) are forgotten after it."""
    capfd.readouterr()  # what came before is not this command's
    folder, saved_env, before = os.getcwd(), dict(os.environ), set(sys.modules)
    os.chdir(cwd or ROOT)
    os.environ.update(env or {})
    try:
        code = _exit_code(args)
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = capfd.readouterr()
    finally:
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(saved_env)
        for name in set(sys.modules) - before:
            if cwd is not None and str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(cwd)):
                del sys.modules[name]
    return subprocess.CompletedProcess(args, code, out, err)
