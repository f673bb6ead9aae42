"""Run a test body on N gloo ranks (spawned processes) and surface the failing rank's traceback."""

from __future__ import annotations

import pytest

from mimo_builder._internal.platform.launch import RankError, launch

DEFAULT_TIMEOUT_S = 240.0


def run_ranks(nproc: int, body, *args, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run ``body(*args)`` on ``nproc`` gloo ranks; return the per-rank results.

    ``body`` must be a module-level function. Each call gets its own rendezvous port, so tests
    are safe under ``pytest -n auto``. A rank's exception fails the test with that rank's
    traceback in the report.
    """
    try:
        return launch(body, nproc, *args, timeout_s=timeout_s)
    except RankError as err:
        pytest.fail(f"rank {err.rank} of {nproc} failed in {body.__name__}:\n{err.trace}", pytrace=False)
