"""Named cases in one CUDA rank (NCCL, world size 1), each read by its own test: a failing case
records its traceback instead of ending the rank, so the other cases still report."""

from __future__ import annotations

import traceback
from typing import Callable

import pytest


def run_cases(sections: dict[str, tuple]) -> dict:
    """Inside the rank: ``name -> (function, *args)``; returns ``name -> result or {"error": trace}``."""
    out = {}
    for name, (fn, *args) in sections.items():
        try:
            out[name] = fn(*args)
        except Exception:  # noqa: BLE001 - reported by the test that reads this case
            out[name] = {"error": traceback.format_exc()}
    return out


def on_cuda_rank(body: Callable[[], dict]) -> dict:
    """``body()`` in one spawned CUDA rank; the rank's own failure fails the test."""
    from mimo_builder._internal.platform.launch import RankError, launch

    try:
        return launch(body, 1, backend="nccl", timeout_s=150)[0]
    except RankError as err:
        pytest.fail(f"the CUDA rank failed:\n{err.trace}", pytrace=False)


def case(results: dict, name: str) -> dict:
    """One case's result; its recorded traceback fails the test."""
    value = results[name]
    if "error" in value:
        pytest.fail(f"{name} raised in the CUDA rank:\n{value['error']}", pytrace=False)
    return value


def needs_causal_conv1d():
    """Skip marker for checks of MCore's fused Mamba path: a CUDA device and causal-conv1d with its
    CUDA extension loading (the kit builds it: scripts/build_causal_conv1d.py)."""
    import torch

    from submodels.mamba import mem_eff_path_available

    return pytest.mark.skipif(not torch.cuda.is_available() or not mem_eff_path_available(),
                              reason="needs a CUDA device and causal-conv1d that loads (the kit builds it: "
                                     "scripts/build_causal_conv1d.py)")
