"""ModelBuilder: MCore's builder interface, plus ports and one shared distributed path.

Subclasses MCore 0.19's ``megatron.training.models.base.ModelBuilder`` and keeps its exact
signatures, so Megatron-Bridge's training setup can call our builders unchanged. A concrete
builder implements ``build_model``, ``transformer_config`` and ``ports``; the distributed
lifecycle (VP chunks, meta init, mixed precision, DDP, hooks) is shared in
:mod:`mimo_builder.distributed`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.training.models import base as mcore_base
from megatron.training.models.base import compose_hooks

from mimo_builder import distributed
from mimo_builder.config import ModelConfig


@dataclass(frozen=True)
class Port:
    """A named tensor a node consumes or produces.

    ``dims`` labels the axes (e.g. ``("batch", "tokens", "hidden")``); ``features`` is the size
    of the last axis where it is fixed by the config (None where it varies, e.g. token ids);
    ``shape`` optionally fixes every axis (None for a free axis), checked on batches. ``dtype``,
    ``high`` and ``like`` say what a batch may bind to the port (checked before a step).
    """

    name: str
    dims: tuple[str, ...]
    features: int | None = None
    required: bool = True
    doc: str = ""
    shape: tuple[int | None, ...] | None = None
    dtype: Literal["float", "int", "number"] = "float"
    """"float": float32 or the node's parameter dtype, finite; "int": int64/int32 ids, >= 0;
    "number": bool, integer or finite floating values (masks, weights)."""
    high: int | None = None
    """For "int" ports: values must be below this bound (e.g. the vocabulary size)."""
    like: str | None = None
    """Another input port whose shape this one must have when both come from the batch."""


@dataclass(frozen=True)
class Ports:
    """A builder's inputs and outputs, by name."""

    inputs: dict[str, Port] = field(default_factory=dict)
    outputs: dict[str, Port] = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: list[Port], outputs: list[Port]) -> "Ports":
        return cls({p.name: p for p in inputs}, {p.name: p for p in outputs})


def token_input_ports(vocab_size: int, max_positions: int | None = None) -> list[Port]:
    """The inputs of a language model over token ids (ids, positions, labels, loss mask): ids and
    labels in [0, ``vocab_size``), positions below ``max_positions`` (None: unbounded)."""
    tokens = ("batch", "tokens")
    return [
        Port("input_ids", tokens, dtype="int", high=vocab_size, doc="token ids in [0, vocab_size)"),
        Port("position_ids", tokens, required=False, dtype="int", high=max_positions, like="input_ids",
             doc="positions in [0, seq_length)" if max_positions else "positions (>= 0)"),
        Port("labels", tokens, required=False, dtype="int", high=vocab_size, like="input_ids",
             doc="next-token ids in [0, vocab_size); no ignore value: mask with loss_mask"),
        Port("loss_mask", tokens, required=False, dtype="number", like="input_ids",
             doc="per-token loss weight"),
    ]


class ModelBuilder(mcore_base.ModelBuilder):
    """Builds one node's model from its :class:`ModelConfig`, on the process groups it is given.

    ``config_class`` names the config type this builder takes (used to rebuild configs from
    dicts). Builders are stateless factories: the config is read, never modified.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, model_config: ModelConfig):
        if not isinstance(model_config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(model_config).__name__}")
        super().__init__(model_config)
        self._transformer_configs: dict[int, tuple[ProcessGroupCollection, TransformerConfig]] = {}

    @property
    def config(self) -> ModelConfig:
        return self._model_config

    @abc.abstractmethod
    def ports(self) -> Ports:
        """Named inputs and outputs with their feature sizes, used to check graph edges."""

    def transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The MCore TransformerConfig for builds on ``pg_collection``: one object shared by
        every chunk and by the distributed wrapping, as in MCore."""
        cached = self._transformer_configs.get(id(pg_collection))
        if cached is None or cached[0] is not pg_collection:
            cached = (pg_collection, self.make_transformer_config(pg_collection))
            self._transformer_configs[id(pg_collection)] = cached
        return cached[1]

    @abc.abstractmethod
    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """A new TransformerConfig for ``pg_collection`` (parallel sizes from its groups)."""

    @abc.abstractmethod
    def build_model(
        self,
        pg_collection: ProcessGroupCollection,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
    ) -> MegatronModule:
        """Build one (virtual) pipeline stage of the model on ``pg_collection``."""

    def run(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward of a built chunk: named input ports in, named output ports out.

        The default serves one-input, one-output modules (``model(x)``); other builders
        override it. Tensors are batch-first.
        """
        ports = self.ports()
        if len(ports.inputs) != 1 or len(ports.outputs) != 1:
            raise NotImplementedError(f"{type(self).__name__} has ports {sorted(ports.inputs)} -> "
                                      f"{sorted(ports.outputs)}: it must define run()")
        (name_in,), (name_out,) = ports.inputs, ports.outputs
        return {name_out: model(inputs[name_in])}

    def run_stage(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], hidden: torch.Tensor | None,
                  first: bool, last: bool) -> dict[str, torch.Tensor]:
        """One forward of one pipeline stage. ``hidden`` is what the previous stage returned
        (None on the first). A stage that is not the last returns ``{"hidden": tensor}``; the
        last returns the output ports. The default serves nodes without pipeline stages."""
        if not (first and last):
            raise NotImplementedError(f"{type(self).__name__} does not split into pipeline stages: "
                                      "it must define run_stage() to run with pp > 1")
        return self.run(model, inputs)

    def output_tokens(self, input_tokens: dict[str, int]) -> dict[str, int]:
        """Length of the token axis of each output for inputs of these lengths (default: kept)."""
        length = next(iter(input_tokens.values()), None)
        return {name: length for name in self.ports().outputs}

    def synthetic_inputs(self, batch_size: int, generator: torch.Generator,
                         tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        """Random inputs for this node's ports that a graph binds to the batch (for demos and
        benchmarks); ``tokens`` gives the token counts arriving on its edge-fed ports."""
        raise NotImplementedError(f"{type(self).__name__} cannot make synthetic inputs")

    def build_distributed_models(
        self,
        pg_collection: ProcessGroupCollection,
        ddp_config: DistributedDataParallelConfig | None = None,
        overlap_param_gather_with_optimizer_step: bool = False,
        use_megatron_fsdp: bool = False,
        use_torch_fsdp2: bool = False,
        wrap_with_ddp: bool = True,
        data_parallel_random_init: bool = False,
        mixed_precision_wrapper: Callable[[Any, MegatronModule], MegatronModule] | None = Float16Module,
        model_type: ModelType = ModelType.encoder_or_decoder,
    ) -> list[MegatronModule]:
        """Build every model chunk of this rank and wrap it for distributed training.

        Same parameters as MCore 0.19.2's ``ModelBuilder.build_distributed_models``; returns the
        list of chunks (one per virtual pipeline stage). Pre-wrap hooks run before wrapping,
        post-wrap hooks after, each list in declared order.
        """
        chunks = distributed.build_distributed_models(
            self.build_model,
            self.transformer_config(pg_collection),
            pg_collection,
            ddp_config=ddp_config,
            overlap_param_gather_with_optimizer_step=overlap_param_gather_with_optimizer_step,
            use_megatron_fsdp=use_megatron_fsdp,
            use_torch_fsdp2=use_torch_fsdp2,
            wrap_with_ddp=wrap_with_ddp,
            data_parallel_random_init=data_parallel_random_init,
            mixed_precision_wrapper=mixed_precision_wrapper,
            pre_wrap_hook=compose_hooks(self.config.resolved_hooks("pre_wrap_hooks")),
            model_type=model_type,
        )
        return compose_hooks(self.config.resolved_hooks("post_wrap_hooks"))(chunks)
