"""The project's exception hierarchy: one base, one subclass per kind of mistake."""

import reprlib

_SHORT = reprlib.Repr(maxlevel=2, maxdict=4, maxlist=4, maxtuple=4, maxset=4, maxstring=100, maxother=100)
MAX_SHOWN_PROBLEMS = 20
"""A GraphError's message lists at most this many problems (``problems`` keeps them all)."""

MAX_PROBLEM_CHARS = 400
"""Each listed problem is cut to this many characters in the message."""


class MimoError(Exception):
    """Base of every error mimo-builder raises on purpose."""


class ConfigError(MimoError, ValueError):
    """A configuration document or value is invalid; the message names where and how to fix it."""


class GraphError(MimoError, ValueError):
    """A graph document is invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = [clip(p, MAX_PROBLEM_CHARS) for p in self.problems[:MAX_SHOWN_PROBLEMS]]
        more = len(self.problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more else "")
        super().__init__(f"graph is invalid ({len(self.problems)} problem(s)):\n{lines}")


class DataError(MimoError, ValueError):
    """A sample does not fit the graph; names the sample (its dataset index) and the field."""


EXIT_PREEMPTED = 85
"""``mimo-builder run``'s exit status when it stopped for a preemption signal (after saving, with
``--save``): a job script can requeue on it (``[ $? -eq 85 ] && scontrol requeue $SLURM_JOB_ID``)."""


class Preempted(MimoError):
    """A run stopped after a step because a rank (or its launcher) got SIGTERM or SIGUSR1."""

    exit_code = EXIT_PREEMPTED


class DependencyError(MimoError, ImportError):
    """An optional dependency is missing; the message names the install command."""


def excerpt(value: object) -> str:
    """A short ``repr`` of a value from user input: long strings and containers are elided, so
    an error message never quotes a whole document."""
    return clip(_SHORT.repr(value), 120)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
