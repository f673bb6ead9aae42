"""A built node's tensors as a Hugging Face mapping names them, and where each is split.

A mapping names parameters as a whole (one-rank) model would: MoE experts by their global index,
where MCore's ``SequentialMLP`` names each expert-parallel rank's experts by their local index.
Here: this rank's tensors under those names (buffers the mapping names included, e.g. a router's
expert bias), the tensor-parallel group that splits each (expert-TP for experts, else TP), and,
for export, the experts the other expert-parallel ranks hold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mimo_builder._internal.assembly.lora import is_adapter_key

EXPERTS = "local_experts"
"""MCore's SequentialMLP's list of this rank's experts."""


class HeldTensors:
    """This rank's tensors of ``module`` under whole-model names (LoRA adapters left out)."""

    def __init__(self, module: torch.nn.Module, wanted: set[str]):
        self.counts = {prefix: sub.num_local_experts for prefix, sub in module.named_modules()
                       if isinstance(getattr(sub, EXPERTS, None), torch.nn.ModuleList) and hasattr(sub, "ep_group")}
        """Expert container prefix -> its experts on each EP rank."""
        self.offsets = {prefix: module.get_submodule(prefix).ep_group.rank() * count
                        for prefix, count in self.counts.items()}
        """Expert container prefix -> the global index of this rank's first expert."""
        self.local = {name: p for name, p in module.named_parameters() if not is_adapter_key(name)}
        self.local.update({name: b for name, b in module.named_buffers() if self.whole(name) in wanted})
        self.tensors = {self.whole(name): t for name, t in self.local.items()}

    def _expert(self, name: str) -> tuple[list[str], int] | None:
        """(the name's parts, the index of its expert number) when ``name`` is an expert's tensor."""
        parts = name.split(".")
        if EXPERTS not in parts:
            return None
        i = parts.index(EXPERTS) + 1
        return (parts, i) if ".".join(parts[:i - 1]) in self.offsets and i < len(parts) else None

    def whole(self, name: str, offset: int | None = None) -> str:
        """The whole-model name of the local tensor ``name`` (``offset``: of another EP rank's first expert)."""
        found = self._expert(name)
        if found is None:
            return name
        parts, i = found
        start = self.offsets[".".join(parts[:i - 1])] if offset is None else offset
        return ".".join([*parts[:i], str(start + int(parts[i])), *parts[i + 1:]])

    def elsewhere(self, name: str) -> bool:
        """Whether the whole-model name ``name`` is an expert another expert-parallel rank holds."""
        return self._expert(name) is not None and name not in self.tensors

    def is_expert(self, name: str) -> bool:
        """Whether ``name`` (local or whole) is an expert's tensor (split over expert-TP, not TP)."""
        return self._expert(name) is not None

    def split_group(self, name: str, pg_collection):
        """The group that splits tensor ``name`` along its partition dim: expert-TP for experts, else TP."""
        if pg_collection is None:
            return None
        return pg_collection.expt_tp if self.is_expert(name) else pg_collection.tp

    def other_experts(self, full: dict[str, torch.Tensor], pg_collection) -> dict[str, torch.Tensor]:
        """Every other expert-parallel rank's experts (whole tensors, under whole-model names), from
        this rank's ``full`` ones. Collective over the EP group (every rank holds as many experts
        in the same order: rank r's local expert j is global expert r * count + j)."""
        ep = getattr(pg_collection, "ep", None)
        if ep is None or ep.size() == 1:
            return {}
        out = {}
        for name in sorted(n for n in self.local if self.is_expert(n)):
            mine = full[self.whole(name)].contiguous()
            pieces = [torch.empty_like(mine) for _ in range(ep.size())]
            dist.all_gather(pieces, mine, group=ep)
            parts, i = self._expert(name)
            count = self.counts[".".join(parts[:i - 1])]
            out.update({self.whole(name, r * count): piece for r, piece in enumerate(pieces)})
        return out
