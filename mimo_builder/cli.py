"""``mimo-builder``, the command line: ``main(argv)`` runs one command and returns its exit code.

``python -m mimo_builder.cli`` (and ``torchrun ... -m mimo_builder.cli``) runs it too.
"""

import sys

from mimo_builder._internal.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
