"""Measured costs of a graph's nodes on one machine (``mimo-builder profile`` writes them).

A :class:`CostTable` is JSON (``format`` 1): the machine it was measured on, and per node and
tensor-parallel size the seconds of one forward and one backward as ``fixed + per_row * rows``
(rows: the samples a rank runs in one call), the optimizer step, the parameters per rank and how
far the profile's rounds differed (``spread``);
the point-to-point link as latency plus seconds per byte; the runtime's own time per operation.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mimo_builder._internal.errors import ConfigError, excerpt

FORMAT = 1

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A measured time: finite and not negative."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Linear(_Strict):
    """Seconds as ``fixed + per_row * rows``."""

    fixed: Seconds = 0.0
    per_row: Seconds = 0.0

    def at(self, rows: float) -> float:
        """Seconds for a call over ``rows`` samples."""
        return self.fixed + self.per_row * rows

    def times(self, factor: float) -> "Linear":
        """This line with both parts ``factor`` times larger."""
        return Linear(fixed=self.fixed * factor, per_row=self.per_row * factor)

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> "Linear":
        """The line through (rows, seconds) points (least squares; both parts kept >= 0)."""
        if len(points) == 1 or len({r for r, _ in points}) == 1:
            rows, seconds = points[0]
            return cls(fixed=0.0, per_row=seconds / max(rows, 1))
        n = len(points)
        mean_r, mean_s = sum(r for r, _ in points) / n, sum(s for _, s in points) / n
        slope = sum((r - mean_r) * (s - mean_s) for r, s in points) / sum((r - mean_r) ** 2 for r, _ in points)
        slope = max(slope, 0.0)
        return cls(fixed=max(mean_s - slope * mean_r, 0.0), per_row=slope)


class NodeCosts(_Strict):
    """One node at one tensor-parallel size (one pipeline stage, the whole node)."""

    forward: Linear
    backward: Linear
    communication: Linear = Field(default_factory=Linear)
    """Per forward and backward together: receiving inputs and sharing them over the TP group."""
    optimizer: Seconds = 0.0
    """Seconds of the node's optimizer step on one rank (its gradient norm included, its gradient
    reduction excluded)."""
    reduction: Seconds = 0.0
    """Seconds of the node's gradient reduction beyond its all-reduce's bytes (MCore's finalize:
    buckets, bookkeeping), measured at the profile's data-parallel size."""
    params: Annotated[int, Field(ge=0)] = 0
    """Parameters on one rank."""
    spread: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """How much slower than its median round the profile's slowest round ran (0.05: 5%); the
    costs above are the median round's."""

    def slowed(self) -> "NodeCosts":
        """These costs at the slow end of the measured range (``1 + spread`` times the median round's)."""
        factor = 1 + self.spread
        return self.model_copy(update={"forward": self.forward.times(factor), "backward": self.backward.times(factor),
                                       "communication": self.communication.times(factor),
                                       "optimizer": self.optimizer * factor, "reduction": self.reduction * factor})


class LinkCosts(_Strict):
    """A point-to-point message between two ranks: ``latency + bytes * seconds_per_byte``."""

    latency: Seconds = 0.0
    seconds_per_byte: Seconds = 0.0

    def seconds(self, size: float) -> float:
        """Seconds to move ``size`` bytes."""
        return self.latency + size * self.seconds_per_byte


class CostTable(_Strict):
    """Measured costs of one graph's nodes on one machine."""

    format: int = FORMAT
    machine: dict[str, str | int | float] = Field(default_factory=dict)
    nodes: dict[str, dict[int, NodeCosts]] = Field(default_factory=dict)
    link: LinkCosts = Field(default_factory=LinkCosts)
    allreduce: LinkCosts = Field(default_factory=LinkCosts)
    """An all-reduce over two ranks (a gradient reduction at dp=2)."""
    overhead_per_op: Seconds = 0.0
    """The runtime's own seconds per forward or backward operation (posting, bookkeeping)."""
    overhead_per_step: dict[Annotated[int, Field(ge=1)], Seconds] = Field(default_factory=dict)
    """The step's own seconds by the number of ranks measured (loss and norm collectives, checks)."""

    @field_validator("nodes")
    @classmethod
    def _tp_sizes(cls, nodes: dict[str, dict[int, NodeCosts]]) -> dict[str, dict[int, NodeCosts]]:
        bad = [f"node '{n}' at tp={tp}" for n, per_tp in nodes.items() for tp in per_tp if tp < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a tensor-parallel size is at least 1")
        return nodes

    def check_covers(self, graph, where: str) -> None:
        """ConfigError naming ``where`` when the table lacks a node of ``graph``: a table measured
        for another graph (which no placement could be predicted from)."""
        missing = [n for n in graph.nodes if not self.nodes.get(n)]
        if missing:
            raise ConfigError(f"{where}: the cost table has no costs of node(s) {', '.join(map(repr, missing))} "
                              f"(it holds {', '.join(map(repr, self.nodes)) or 'none'}); it was measured for "
                              "another graph: run mimo-builder profile on this document")

    def allreduce_seconds(self, dp: int, size: float) -> float:
        """A ring all-reduce of ``size`` bytes over ``dp`` ranks (the two-rank one as measured)."""
        if dp <= 1:
            return 0.0
        return self.allreduce.latency * (dp - 1) + 2 * (dp - 1) / dp * self.allreduce.seconds_per_byte * size

    def step_overhead(self, world_size: int) -> float:
        """The per-step seconds measured on the most ranks up to ``world_size`` (else the fewest)."""
        if not self.overhead_per_step:
            return 0.0
        fitting = [n for n in self.overhead_per_step if n <= world_size] or [min(self.overhead_per_step)]
        return self.overhead_per_step[max(fitting)]

    def slowed(self) -> "CostTable":
        """The table with every node at the slow end of its measured range (:meth:`NodeCosts.slowed`)."""
        return self.model_copy(update={"nodes": {name: {tp: costs.slowed() for tp, costs in per_tp.items()}
                                                 for name, per_tp in self.nodes.items()}})

    def node(self, name: str, tp: int) -> NodeCosts:
        """The costs of ``name`` at tensor-parallel size ``tp`` (a ConfigError if not measured)."""
        found = self.nodes.get(name, {}).get(tp)
        if found is None:
            measured = sorted(self.nodes.get(name, {}))
            raise ConfigError(f"the cost table has no costs for node '{name}' at tp={tp} (measured: "
                              f"{measured or 'none'}); profile again with a larger --world-size")
        return found

    def save(self, path: str | Path) -> None:
        """Write the table as JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        """Read a table :meth:`save` wrote (a ConfigError naming the file otherwise)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"--costs {path}: not a readable cost table ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"--costs {path}: a cost table of format {FORMAT} expected "
                              f"(mimo-builder profile writes one)")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"--costs {path}: " + "; ".join(map(_problem, err.errors()[:5]))) from None


def _problem(error: dict) -> str:
    """One of pydantic's errors as 'field.path: what (got value)'."""
    where, value = ".".join(map(str, error["loc"])), error["input"]
    what = error["msg"].removeprefix("Value error, ")
    return f"{where}: {what}" + ("" if isinstance(value, dict) else f" (got {excerpt(value)})")


def describe_machine(device: str) -> dict[str, str | int | float]:
    """Where the costs were measured: the device, the host, its CPUs and torch, and when."""
    import os

    import torch

    machine: dict[str, str | int | float] = {
        "device": device, "host": platform.node(), "cpus": os.cpu_count() or 1, "torch": torch.__version__,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine
