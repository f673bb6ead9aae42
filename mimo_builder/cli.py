"""``mimo-builder``, the command line: ``main(argv)`` runs one command and returns its exit code;
``console()`` (the installed script) runs the process's command line and ends the process.

``python -m mimo_builder.cli`` (and ``torchrun ... -m mimo_builder.cli``) runs it too.
"""

import atexit
import os
import sys

from mimo_builder._internal.cli import main

__all__ = ["console", "main"]


def console() -> None:
    """Run the command line, then end the process with its exit code once the exit handlers have
    run (multiprocessing's, logging's), without tearing down every imported module one by one:
    that teardown took 1.7 s after each command with torch and Megatron-Core imported."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away after the command's last line
        pass
    atexit._run_exitfuncs()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    console()
