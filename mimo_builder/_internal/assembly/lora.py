"""LoRA adapters on a node's Megatron-Core linear layers, split as the layers are split over TP.

An adapted layer computes ``W x + alpha / rank * B A dropout(x)``; B starts at zero, so a fresh
adapter leaves the node's outputs unchanged. The adapters follow the layer's tensor parallelism:

- column-parallel (W split by output rows): A [rank, in] is whole on every TP rank, B
  [out / tp, rank] is split like W (part by part where W packs several, as Mamba's ``in_proj``);
  ``A x`` passes MCore's copy-to-TP region, so its gradient is summed over TP;
- row-parallel (W split by input columns): A [rank, in / tp] is split like W; ``A x`` is summed
  over TP (reduce-from-TP region) before the whole B [out, rank].

So a node at TP=2 computes what it computes at TP=1. Each adapter's A is drawn from a generator
seeded by the graph seed, the node and the layer's global position, so it is the same on every
placement. Adapting a layer swaps its class for a subclass with the adapter (the module, its
parameter names and its checkpoint keys stay; ``lora_a`` and ``lora_b`` are added beside
``weight``), and freezes every other parameter of the node.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from mimo_builder._internal.document.graph import NodeLora
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.platform import private

ADAPTER_PARAMS = ("lora_a", "lora_b")
NOT_ADAPTED = ("output_layer",)  # the language head: its weight may be the embedding's


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict or checkpoint key names an adapter tensor."""
    return any(f".{name}" in key or key.startswith(name) for name in ADAPTER_PARAMS)


class _Adapted:
    """Mixin over an MCore linear class: its forward plus the adapter's update."""

    lora_a: torch.nn.Parameter
    lora_b: torch.nn.Parameter
    lora_scale: float
    lora_dropout: float

    def forward(self, input_, *args, **kwargs):
        """The base layer's (output, bias) with the adapter's update added to the output."""
        output, bias = super().forward(input_, *args, **kwargs)
        return output + self.lora_update(input_).to(output.dtype), bias

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A dropout(x)``, in this rank's share of the output."""
        x = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        group = self.tp_group
        if isinstance(self, RowParallelLinear):
            if not self.input_is_parallel:
                x = scatter_to_tensor_model_parallel_region(x, group=group)
            inner = reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_a.to(x.dtype)), group=group)
            return self.lora_scale * F.linear(inner, self.lora_b.to(x.dtype))
        inner = copy_to_tensor_model_parallel_region(F.linear(x, self.lora_a.to(x.dtype)), group=group)
        out = self.lora_scale * F.linear(inner, self.lora_b.to(x.dtype))
        return gather_from_tensor_model_parallel_region(out, group=group) if self.gather_output else out

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's entries, with the split adapter tensor sharded like the weight."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in ADAPTER_PARAMS:
            param = getattr(self, name)
            if not getattr(param, "tensor_model_parallel", False):
                continue  # whole on every TP rank: the base's replicated entry is right
            key = f"{prefix}{name}"
            out[key] = make_tp_sharded_tensor_for_checkpoint(
                param, key, param.partition_dim, prepend_offsets=sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
            sizes = getattr(param, "partition_sizes", None)
            if sizes and len(sizes) > 1:  # packed parts are split over TP one by one
                out[key] = private.split_tensor_factory(out[key], list(sizes), [f"part{i}" for i in range(len(sizes))], 0)
        return out

    def lora_delta(self) -> torch.Tensor:
        """``scale * B A`` in fp32: what the adapter adds to this rank's weight shard."""
        return self.lora_scale * (self.lora_b.detach().float() @ self.lora_a.detach().float())

    def merge_adapter(self) -> None:
        """Fold :meth:`lora_delta` into this rank's weight shard and zero B (the output is unchanged)."""
        with torch.no_grad():
            self.weight.add_(self.lora_delta().to(self.weight.dtype))
            self.lora_b.zero_()


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[cls] = type(f"Lora{cls.__name__}", (_Adapted, cls), {"__module__": __name__})
    return _ADAPTED_CLASSES[cls]


def add_adapters(chunks: list[torch.nn.Module], lora: NodeLora, seed: int, node: str,
                 every_target_here: bool = False) -> list[str]:
    """Adapt the targeted linear layers of ``chunks`` and freeze everything else; returns the
    adapted modules' names. ConfigError names the node when a layer cannot be adapted
    (Transformer Engine's fused layers) and, with ``every_target_here`` (the rank holds every
    layer kind of the node and validation could not check the names), when a target matches
    nothing here. A pipeline stage may hold none of the targets."""
    targets = set(lora.targets) if lora.targets is not None else None
    adapted, found = [], set()
    for chunk in chunks:
        chunk.requires_grad_(False)
        positions = _layer_positions(chunk)
        for name, module in list(chunk.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in NOT_ADAPTED or (targets is not None and leaf not in targets):
                continue
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                if targets is not None and _is_linear(module):
                    raise ConfigError(f"node '{node}' lora.targets: {leaf!r} is a {type(module).__name__}, which "
                                      "cannot take an adapter (MCore's Column/RowParallelLinear only: build the "
                                      "node with impl: local)")
                continue
            if getattr(module, "is_expert", False):
                continue
            _adapt(module, leaf, lora, _seed(seed, node, _global_name(name, positions)))
            adapted.append(name)
            found.add(leaf)
    missing = sorted((targets or set()) - found)
    if every_target_here and (missing or not adapted):
        raise ConfigError(f"node '{node}' lora.targets: {', '.join(map(repr, missing)) or 'nothing'} matches no "
                          "linear layer on this rank")
    return adapted


def merge_lora(model) -> int:
    """Fold every adapter of ``model`` (a CompositeModel, a chunk or any module) into its base
    weight and zero its B; returns how many were merged. The outputs stay the same; export
    and later fine-tuning see plain weights (the adapters remain, at zero)."""
    merged = 0
    for module in model.modules():
        if isinstance(module, _Adapted):
            module.merge_adapter()
            merged += 1
    return merged


def merged_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> this rank's shard of each adapted weight with its adapter folded in
    (carrying the weight's TP attributes); ``module`` itself is not changed."""
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, _Adapted):
            merged = (sub.weight.detach().float() + sub.lora_delta()).to(sub.weight.dtype)
            copy_tensor_model_parallel_attributes(merged, sub.weight)
            if hasattr(sub.weight, "partition_sizes"):
                merged.partition_sizes = sub.weight.partition_sizes
            out[f"{name}.weight" if name else "weight"] = merged
    return out


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every adapter folded into its weight and no adapter keys
    (what an export writes); ``module`` itself is not changed."""
    state = {k: v for k, v in module.state_dict().items() if not is_adapter_key(k)}
    return {**state, **merged_weights(module)}


def _adapt(module, leaf: str, lora: NodeLora, seed: int) -> None:
    weight = module.weight
    row = isinstance(module, RowParallelLinear)
    out_local, in_local = weight.shape
    tp = module.tp_group.size() if module.tp_group is not None else 1
    in_full = in_local * tp if row else in_local
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5)), as torch.nn.Linear and PEFT
    full_a = torch.empty(lora.rank, in_full).uniform_(-bound, bound, generator=generator)
    a = full_a.narrow(1, module.tp_group.rank() * in_local, in_local) if row and tp > 1 else full_a
    module.__class__ = _adapted_class(type(module))
    module.lora_a = torch.nn.Parameter(a.to(weight.device, weight.dtype).contiguous())
    module.lora_b = torch.nn.Parameter(torch.zeros(out_local, lora.rank, device=weight.device, dtype=weight.dtype))
    module.lora_scale, module.lora_dropout = lora.scale, lora.dropout
    split, whole = (module.lora_a, module.lora_b) if row else (module.lora_b, module.lora_a)
    split.tensor_model_parallel, split.partition_dim, split.partition_stride = True, 1 if row else 0, 1
    whole.tensor_model_parallel, whole.partition_dim, whole.partition_stride = False, -1, 1
    sizes = getattr(weight, "partition_sizes", None) or _gated_parts(module, leaf, out_local)
    if not row and sizes:
        split.partition_sizes = list(sizes)


def _gated_parts(module, leaf: str, out_local: int) -> list[int] | None:
    """A gated MLP's fc1 holds [gate | up] per TP rank: two parts split over TP separately."""
    gated = getattr(getattr(module, "config", None), "gated_linear_unit", False) and leaf == "linear_fc1"
    return [out_local // 2, out_local // 2] if gated else None


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Module) and type(module).__name__.endswith("Linear")


def _layer_positions(chunk: torch.nn.Module) -> dict[str, int]:
    """Module name -> global layer number for MCore's layers (the same under any pipeline split)."""
    return {name: module.layer_number for name, module in chunk.named_modules()
            if isinstance(getattr(module, "layer_number", None), int)}


def _global_name(name: str, positions: dict[str, int]) -> str:
    """``name`` with its layer's local path replaced by the layer's global number."""
    owner = max((p for p in positions if name.startswith(p + ".")), key=len, default=None)
    return name if owner is None else f"layer{positions[owner]}.{name[len(owner) + 1:]}"


def _seed(seed: int, node: str, name: str) -> int:
    return zlib.crc32(f"{seed}/{node}/{name}".encode())
