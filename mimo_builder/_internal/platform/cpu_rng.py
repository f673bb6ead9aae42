"""MCore's model-parallel RNG tracker over the CPU generator, and seeding for either device."""

from __future__ import annotations

import contextlib

import torch

SEEDS = 2**64
"""A seed is an integer in [0, SEEDS): what torch's generators take (the CLI refuses others)."""


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into [0, SEEDS): a seed near the top of the range still seeds
    the generators derived from it (per step, per epoch, per TP rank)."""
    return (seed + offset) % SEEDS


class CPURNGStatesTracker:
    """MCore's RNG-tracker interface over the CPU generator (named states, ``fork`` swaps them).

    Keeps dropout and per-rank initialisation inside model-parallel regions reproducible on CPU,
    as MCore's CUDA tracker does on GPU.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget every named state and seed; the tracker is uninitialised again."""
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        """Whether a state was added or set since the last reset."""
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of the name -> CPU generator state mapping."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every named state with ``states`` (a copy is kept)."""
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Track a new state ``name`` seeded with ``seed``; a ValueError if the name or seed is taken."""
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the block on state ``name`` of the CPU generator, then save it and restore the outer state."""
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was never added: call compat.seed_rng(seed) first")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_rng(seed: int, *, tp_rank: int = 0, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """Seed torch and MCore's RNG tracker the way ``model_parallel_cuda_manual_seed`` does.

    The default and data-parallel states get ``seed``; the tensor-parallel state differs by TP
    rank; the expert state by EP and expert-TP rank. Works on CPU (after ``init_runtime``) and CUDA.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    torch.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, offset_seed(seed, 2718 + tp_rank))
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, offset_seed(seed, 1024 + 100 * ep_rank + etp_rank)
    )
