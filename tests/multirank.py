"""Run a test body on N gloo ranks and surface the failing rank's traceback.

Ranks are kept warm per size for the whole test session (:class:`mimo_builder.launch.RankPool`):
starting a rank costs about ten seconds of imports on this machine kind, the body usually less.
A failing body stops its pool; the next test starts fresh ranks. Tests that need a fresh
process (one without some workaround installed) call :func:`mimo_builder.launch.launch` instead.
"""

from __future__ import annotations

import atexit

import pytest

from mimo_builder.launch import RankError, RankPool, launch

DEFAULT_TIMEOUT_S = 240.0
_pools: dict[int, RankPool] = {}


def run_ranks(nproc: int, body, *args, timeout_s: float = DEFAULT_TIMEOUT_S, fresh: bool = False):
    """Run ``body(*args)`` on ``nproc`` gloo ranks; return the per-rank results.

    ``body`` must be a module-level function. It runs in ranks that may have run other bodies
    before: it must not rely on process state it did not set (seed what it uses). A body that
    drives failure paths (aborted groups, peers that give up) passes ``fresh=True`` and gets
    ranks of its own. A rank's exception fails the test with that rank's traceback in the report.
    """
    try:
        if fresh:
            return launch(body, nproc, *args, timeout_s=timeout_s)
        return _pools.setdefault(nproc, RankPool(nproc)).run(body, *args, timeout_s=timeout_s)
    except RankError as err:
        pytest.fail(f"rank {err.rank} of {nproc} failed in {body.__name__}:\n{err.trace}", pytrace=False)


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
