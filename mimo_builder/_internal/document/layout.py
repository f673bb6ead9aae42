"""A node's ranks and their factorisation: pure arithmetic, checked with the numbers.

A :class:`Layout` is a contiguous rank range (``offset``, ``size``) split as
``tp * cp * dp * pp`` (dp derived), plus an expert factorisation ``etp * ep * edp * pp``;
:func:`fit_to_world` spreads a node over a whole world (``--colocate``). The process groups made
from layouts are :mod:`mimo_builder._internal.placement`'s matter.
"""

from __future__ import annotations

from dataclasses import dataclass

# Base grid, fastest-varying first (MCore's default order "tp-cp-ep-dp-pp" without ep).
BASE_DIMS = ("tp", "cp", "dp", "pp")
EXPERT_DIMS = ("etp", "ep", "edp", "pp")

# ProcessGroupCollection field -> dims of the base grid.
BASE_GROUPS = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("dp", "cp"),
    "tp_cp": ("tp", "cp"),
    "mp": ("tp", "pp"),
    "tp_dp_cp": ("tp", "dp", "cp"),
    "intra_dist_opt": ("tp", "cp", "dp", "pp"),  # the whole node: distributed-optimizer grad stats
}
# ProcessGroupCollection field -> dims of the expert view.
EXPERT_GROUPS = {
    "ep": ("ep",),
    "expt_tp": ("etp",),
    "expt_dp": ("edp",),
    "tp_ep": ("etp", "ep"),
    "tp_ep_pp": ("etp", "ep", "pp"),
}


@dataclass(frozen=True, order=True)
class Layout:
    """A node's ranks and their factorisation. ``dp`` and ``edp`` are derived."""

    offset: int
    size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 0  # 0 means "same as tp"

    @property
    def expert_tp(self) -> int:
        """Tensor-parallel size of expert layers (``etp``, else ``tp``)."""
        return self.etp or self.tp

    @property
    def dp(self) -> int:
        """Data-parallel size: what ``tp * cp * pp`` leaves of ``size``."""
        return self.size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        """Expert data-parallel size: what ``etp * ep * pp`` leaves of ``size``."""
        return self.size // (self.expert_tp * self.ep * self.pp)

    @property
    def ranks(self) -> range:
        """The global ranks of the node, ``offset`` to ``offset + size - 1``."""
        return range(self.offset, self.offset + self.size)

    def problems(self) -> list[str]:
        """Arithmetic errors of this layout, each with the numbers and a fix."""
        out = []
        if self.offset < 0 or self.size < 1:
            out.append(f"offset must be >= 0 and size >= 1 (got offset={self.offset}, size={self.size})")
            return out
        for name in ("tp", "cp", "pp", "ep", "expert_tp"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if out:
            return out
        model = self.tp * self.cp * self.pp
        if self.size % model:
            out.append(
                f"size {self.size} is not divisible by tp*cp*pp = {self.tp}*{self.cp}*{self.pp} = {model}; "
                f"choose a size that is a multiple of {model}"
            )
        expert = self.expert_tp * self.ep * self.pp
        if not out and self.size % expert:
            out.append(
                f"size {self.size} is not divisible by etp*ep*pp = {self.expert_tp}*{self.ep}*{self.pp} = {expert}; "
                f"ep*etp must divide tp*cp*dp = {self.size // self.pp}"
            )
        return out

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The global rank at these coordinates (inverse of :meth:`coords`)."""
        return self.offset + tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def expert_coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinates along the expert view's etp/ep/edp/pp (``rank`` in ``ranks``)."""
        local, out = rank - self.offset, {}
        for name, extent in zip(("etp", "ep", "edp", "pp"), (self.expert_tp, self.ep, self.edp, self.pp)):
            out[name], local = local % extent, local // extent
        return out

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinates along tp/cp/dp/pp (``rank`` must be in ``ranks``); tp varies
        fastest. (Called per rank and node in plans of many thousand ranks: plain arithmetic.)"""
        local, tp, cp = rank - self.offset, self.tp, self.cp
        inner, dp = local // (tp * cp), self.size // (tp * cp * self.pp)
        return {"tp": local % tp, "cp": local // tp % cp, "dp": inner % dp, "pp": inner // dp}


def fit_to_world(sizes: dict[str, int], world_size: int) -> tuple[dict[str, int], list[str]]:
    """Parallel sizes for a node spanning all ``world_size`` ranks (``--colocate``), from its
    declared ``tp``, ``cp``, ``pp``, ``ep``, ``etp``: each kept where it divides what the sizes
    before it leave, shrunk to what is left where that is smaller, else a problem with the
    numbers. ``etp`` (None: as tp) and ``ep`` split the ranks left by ``pp`` (the expert view).
    Returns the sizes and the problems (field, text)."""
    out, problems = dict(sizes), []
    left = world_size
    for field in ("tp", "cp", "pp"):
        out[field], left = _fit(field, sizes[field], left, problems)
    left = world_size // out["pp"]
    for field in ("etp", "ep"):
        declared = sizes.get(field) or out["tp"]  # etp None: as tp
        out[field], left = _fit(field, declared, left, problems) if sizes.get(field) else (declared, left // declared)
    return out, problems


def _fit(field: str, size: int, left: int, problems: list) -> tuple[int, int]:
    if left % size == 0:
        return size, left // size
    if size > left:
        return left, 1
    problems.append((field, f"{size} does not divide the {left} ranks left for it once every node spans the "
                            f"world; choose a world size it divides, or a {field} that divides {left}"))
    return 1, left
