"""Per-node parallel layout -> HyperCommGrid -> ProcessGroupCollection, with group sharing.

The layout arithmetic is :mod:`mimo_builder._internal.document.layout`'s (re-exported here).
:func:`create_process_groups` makes one grid and one set of groups per distinct layout; every
rank must call it with the same layouts, because ``new_group`` is collective over WORLD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

from mimo_builder._internal.document.layout import (  # noqa: F401 (public here too)
    BASE_DIMS, BASE_GROUPS, EXPERT_DIMS, EXPERT_GROUPS, Layout, fit_to_world)
from mimo_builder._internal.platform import private


@dataclass
class ProcessGroups:
    """Groups created for a set of layouts: a collection per layout this rank belongs to."""

    collections: dict[Layout, ProcessGroupCollection] = field(default_factory=dict)
    grids: dict[Layout, HyperCommGrid] = field(default_factory=dict)
    num_groups: int = 0  # process groups created, on every rank (see layout_group_count)

    def for_layout(self, layout: Layout) -> ProcessGroupCollection | None:
        """This rank's collection for ``layout``, or None if the rank is outside it."""
        return self.collections.get(layout)

    def set_timeout(self, timeout) -> None:
        """Set the collective timeout (a timedelta) of every group this rank belongs to."""
        for group in self._member_groups():
            group.set_timeout(timeout)

    def _member_groups(self) -> list[dist.ProcessGroup]:
        unique = {}
        for pgs in self.collections.values():
            for group in vars(pgs).values():
                if isinstance(group, dist.ProcessGroup):
                    unique[id(group)] = group
        return list(unique.values())

    def destroy(self) -> None:
        """Release every group of these layouts on this rank (no collective; idempotent). torch
        forgets them at once; their sockets and threads go with the last module holding one."""
        for grid in self.grids.values():
            grid.destroy()  # MCore's: the grid's groups of every view
        release(*self._member_groups())  # the rest (embedding groups)
        self.grids.clear()
        self.collections.clear()

    def abort(self) -> None:
        """Abort every group this rank belongs to: peers blocked in their collectives fail at
        once ("connection closed") instead of waiting for the timeout. The groups are unusable."""
        for group in self._member_groups():
            private.abort_group(group)
        self.grids.clear()
        self.collections.clear()


def create_process_groups(layouts, backend: str | None = None, timeout=None) -> ProcessGroups:
    """Create one grid and one set of groups per distinct layout, in a deterministic order.

    Every rank must call this with the same layouts. Returns the collections of the layouts
    that hold this rank, and how many group enumerations were created in all. ``timeout`` (a
    timedelta) bounds each collective on these groups; None keeps torch's default.
    """
    result = ProcessGroups()
    rank = dist.get_rank()
    options = {} if timeout is None else {"timeout": timeout}
    for layout in sorted(set(layouts)):
        grid, pgs, count = _create_layout_groups(layout, backend, options)
        result.grids[layout] = grid
        result.num_groups += count
        if rank in layout.ranks:
            result.collections[layout] = ProcessGroupCollection(**pgs)
    return result


def release(*groups: dist.ProcessGroup | None) -> None:
    """Destroy each group torch still knows (None and already destroyed ones are skipped)."""
    for group in groups:
        if group is not None and private.group_alive(group):
            dist.destroy_process_group(group)


def count_process_groups(layouts) -> int:
    """How many process groups :func:`create_process_groups` creates in all, computed without
    processes: every subgroup of every enumeration (each is one ``new_group`` call on every rank)."""
    return sum(layout_group_count(layout) for layout in set(layouts))


def layout_group_count(layout: Layout) -> int:
    """The groups one layout's grid, expert view and embedding groups make (a group per rank
    list: e.g. ``size / tp`` TP groups)."""
    base = dict(zip(BASE_DIMS, (layout.tp, layout.cp, layout.dp, layout.pp)))
    expert = dict(zip(EXPERT_DIMS, (layout.expert_tp, layout.ep, layout.edp, layout.pp)))
    count = sum(layout.size // math.prod(base[d] for d in dims) for dims in BASE_GROUPS.values())
    count += sum(layout.size // math.prod(expert[d] for d in dims)
                 for dims in EXPERT_GROUPS.values() if dims != ("pp",))  # ("pp",) reuses the base group
    return count + 2 * (layout.size // layout.pp)  # embd, pos_embd: one per pipeline


def _create_layout_groups(layout: Layout, backend, options):
    grid = HyperCommGrid(
        [layout.tp, layout.cp, layout.dp, layout.pp], list(BASE_DIMS), layout.offset, backend
    )
    grid.register_view(
        "expert",
        [layout.expert_tp, layout.ep, layout.edp, layout.pp],
        list(EXPERT_DIMS),
        shared_dims=["pp"],
    )
    pgs = {name: grid.create_pg(list(dims), **options) for name, dims in BASE_GROUPS.items()}
    for name, dims in EXPERT_GROUPS.items():
        # A dim shared with the base view reuses the base group instead of creating one.
        pgs[name] = grid.create_pg(list(dims), view="expert", **options) if dims != ("pp",) else pgs["pp"]
    pp_stages = grid.get_rank_enum("pp")
    pgs["embd"] = _subgroup([sorted({s[0], s[-1]}) for s in pp_stages], backend, options)
    pgs["pos_embd"] = _subgroup([[s[0]] for s in pp_stages], backend, options)
    return grid, pgs, layout_group_count(layout)


def _subgroup(enumeration: list[list[int]], backend, options):
    group, _ = dist.new_subgroups_by_enumeration(enumeration, backend=backend, **options)
    return group


def tp_cp_groups(layouts) -> dict:
    """A fresh copy of each layout's TP x CP groups (ranks of equal DP and PP coordinates,
    contiguous), for the schedule's broadcasts and CP gradient sums: layout -> this rank's group.
    Collective over WORLD: every rank calls it with the same layouts."""
    groups = {}
    for layout in sorted({layout for layout in layouts if layout.tp * layout.cp > 1}):
        block = layout.tp * layout.cp
        enumeration = [list(layout.ranks[i:i + block]) for i in range(0, layout.size, block)]
        group, _ = dist.new_subgroups_by_enumeration(enumeration, backend=dist.get_backend())
        if dist.get_rank() in layout.ranks:
            groups[layout] = group
    return groups


def dp_groups(layouts) -> dict:
    """A fresh copy of each layout's DP groups (ranks of equal TP, CP and PP coordinates, as the
    layout's own ``dp`` group), for collectives inside a step (the encoders' item exchange) that a
    failing rank must be able to drop: layout -> this rank's group. Collective over WORLD."""
    groups = {}
    for layout in sorted({layout for layout in layouts if layout.dp > 1}):
        grid = HyperCommGrid([layout.tp, layout.cp, layout.dp, layout.pp], list(BASE_DIMS), layout.offset)
        group, _ = dist.new_subgroups_by_enumeration(grid.get_rank_enum("dp"), backend=dist.get_backend())
        if dist.get_rank() in layout.ranks:
            groups[layout] = group
    return groups
