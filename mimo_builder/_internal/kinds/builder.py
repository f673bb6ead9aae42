"""ModelBuilder: MCore's builder interface, plus ports and one shared distributed path.

Subclasses MCore 0.19's ``megatron.training.models.base.ModelBuilder`` and keeps its exact
signatures, so Megatron-Bridge's training setup can call our builders unchanged. A concrete
builder defines ``ports`` and ``build_model`` (and ``run``, ``output_tokens``, ... where
:mod:`mimo_builder._internal.kinds.contract` says so); a builder with MCore transformer layers also overrides
``make_transformer_config``. The distributed lifecycle (VP chunks, meta init, mixed precision,
DDP, hooks) is shared in :mod:`mimo_builder._internal.kinds.distributed`. docs/extending.md walks through one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.training.models import base as mcore_base
from megatron.training.models.base import compose_hooks

from mimo_builder._internal.kinds import distributed
from mimo_builder._internal.kinds import costs as layer_costs
from mimo_builder._internal.platform.compat import resolve_device
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.errors import ConfigError
from mimo_builder._internal.kinds.costs import StageCost
from mimo_builder._internal.kinds.transformer import parallel_transformer_config

if TYPE_CHECKING:
    from mimo_builder._internal.hf import HFMapping
    from mimo_builder._internal.runtime.generation import GenerationOptions
    from mimo_builder._internal.runtime.packing import PackedCount


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
        """Ports from lists of inputs and outputs (each keyed by its name)."""
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
    __mimo_builder_base__: ClassVar[bool] = True  # how contract and registry recognise builders

    def __init__(self, model_config: ModelConfig):
        if not isinstance(model_config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(model_config).__name__}")
        super().__init__(model_config)
        self._transformer_configs: dict[int, tuple[ProcessGroupCollection, TransformerConfig]] = {}

    @property
    def config(self) -> ModelConfig:
        """The config this builder was made with (read, never modified)."""
        return self._model_config

    def training_problems(self, trains: bool) -> list[str]:
        """Why this node cannot be built (and, when ``trains``, trained) on this machine, each
        starting with the config field to change; checked at validate. None by default."""
        return []

    def packing_problems(self) -> list[str]:
        """Why this node cannot pack its samples on this machine (checked at validate where the
        batch binds its ``seq_lengths``), each starting with the config field to change. None by default."""
        return []

    outputs_in_use: frozenset[str] | None = None
    """The output ports the running graph reads from this node (set by the schedule; None: all).
    A builder may skip computing an optional output that is not among them."""

    generation: "GenerationOptions | None" = None
    """Set by ``GraphSchedule.generate`` for one forward-only pass: how a node with a ``generated``
    output picks its new tokens (:mod:`mimo_builder._internal.runtime.generation`); None otherwise."""

    packed: "PackedCount | None" = None
    """What this node packed since the run last took it (:meth:`take_packed`): a builder that packs
    its samples adds each training forward's ``Packing.count()``; None: nothing packed."""

    def take_packed(self) -> "PackedCount | None":
        """What this node packed since the last call (None: nothing), for the run's report."""
        packed, self.packed = self.packed, None
        return packed

    def uses_output(self, port: str) -> bool:
        """Whether the running graph reads output ``port`` (see :attr:`outputs_in_use`)."""
        return self.outputs_in_use is None or port in self.outputs_in_use

    def loss_tokens(self, inputs: dict[str, torch.Tensor], samples: int) -> torch.Tensor:
        """How many tokens of each of ``samples`` samples this node's ``loss`` output averages over
        (a float tensor ``[samples]``; a weight sum where a mask weighs tokens), from the node's batch-bound
        inputs of those samples. The step weighs each microbatch's loss by its share of the global
        batch's count (:mod:`~mimo_builder._internal.runtime.loss_tokens`). Default: each sample's
        ``loss_mask`` sum, else its ``labels`` count, else 1 (a loss that is a mean over samples)."""
        mask = inputs.get("loss_mask")
        if mask is not None:
            return mask.reshape(samples, -1).sum(1)  # no float64 copy of the mask: counts are summed as floats
        labels = inputs.get("labels")
        per_sample = labels[0].numel() if labels is not None and samples else 1
        return torch.full((samples,), float(per_sample), dtype=torch.float64)

    def param_inits(self) -> dict[tuple[type, str], Callable[[torch.nn.Module, torch.Tensor], None]]:
        """How this kind's own modules draw their random parameters, by (module class, parameter
        name): each rule fills the full tensor (float32, CPU) from torch's default generator, which
        the build seeds per parameter so the node's weights do not depend on its placement
        (:mod:`mimo_builder._internal.assembly.seeded_init`, which covers MCore's layers)."""
        return {}

    def linear_layers(self) -> frozenset[str] | None:
        """Module names of the Megatron-Core linear layers this node builds in its blocks (what
        ``lora.targets`` may name, checked at validate); None: not declared, checked at build."""
        return None

    def linear_sizes(self) -> dict[str, tuple[int, int]] | None:
        """Whole (in, out) features of the layers :meth:`linear_layers` names (what ``lora.rank``
        is checked against at validate): the config's ``linear_sizes()`` where it has one, else None."""
        sizes = getattr(self.config, "linear_sizes", None)
        known = self.linear_layers()
        if sizes is None or known is None:
            return None
        return {name: size for name, size in sizes().items() if name in known}

    @abc.abstractmethod
    def ports(self) -> Ports:
        """Named inputs and outputs with their feature sizes, used to check graph edges."""

    def transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """The MCore TransformerConfig for builds on ``pg_collection``: one object shared by
        every chunk and by the distributed wrapping, as in MCore. On CPU it always initialises
        on the CPU (``use_cpu_initialization``: MCore's default allocates on the GPU)."""
        cached = self._transformer_configs.get(id(pg_collection))
        if cached is None or cached[0] is not pg_collection:
            cached = (pg_collection, self._checked_transformer_config(pg_collection))
            self._transformer_configs[id(pg_collection)] = cached
        return cached[1]

    def make_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        """A new TransformerConfig for ``pg_collection`` (parallel sizes from its groups).

        The default carries only what MCore's wrappers read (parallel sizes, the config's
        ``dtype`` if it has one, CPU initialisation): enough for a module without transformer
        layers. Builders with MCore transformer layers override it, usually with
        :func:`mimo_builder._internal.kinds.transformer.make_transformer_config`."""
        return parallel_transformer_config(pg_collection, dtype=getattr(self.config, "dtype", "fp32"))

    def _checked_transformer_config(self, pg_collection: ProcessGroupCollection) -> TransformerConfig:
        config = self.make_transformer_config(pg_collection)
        if not isinstance(config, TransformerConfig):
            raise ConfigError(f"{type(self).__qualname__}.make_transformer_config() returned "
                              f"{type(config).__name__}, not a megatron.core TransformerConfig")
        if resolve_device().type == "cpu" and not config.init_model_with_meta_device:
            config.use_cpu_initialization = True
        return config

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
        """How many tokens each output carries, for inputs of these lengths.

        ``input_tokens`` maps each input port to the length of its first axis after the batch
        (tokens or frames; channels for an image). Required (validation says so) when an output
        feeds a port with a ``tokens`` axis, e.g. a backbone's placeholder tokens: there is no
        default, because no axis of an input says how many tokens an encoder makes.
        """
        raise ConfigError(f"{type(self).__qualname__} does not define output_tokens(); define it to return "
                          f"the token count of each output in {sorted(self.ports().outputs)}")

    ragged_inputs: ClassVar[frozenset[str]] = frozenset()
    """Input ports that take :class:`~mimo_builder._internal.runtime.items.Items`: per sample a list
    of items of their own sizes (``run()`` then gets Items there, e.g. through ``run_items``)."""

    def item_tokens(self, port: str, shape: tuple[int, ...]) -> dict[str, int]:
        """Tokens each output carries for ONE item of ``shape`` (without the batch axis) on the
        ragged input ``port``; a ValueError saying which limit an item breaks (a size beyond the
        maximum, not a multiple of the patch). The default: ``output_tokens`` of the first axis."""
        return self.output_tokens({port: shape[0]})

    def video_items(self, port: str, frames: torch.Tensor) -> list[torch.Tensor]:
        """The items a video ``frames`` (its frames along the first axis) becomes on the ragged
        input ``port``, which one tag names together. The default: its frames one by one."""
        return list(frames)

    def features_from_waveform(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """The item this node's ``features`` port takes for one clip (without the batch axis), from
        its mono ``waveform`` (float32 [samples] in [-1, 1]) at ``sample_rate`` Hz: the node's own
        front end (resampling, log-mel), used for ``.wav`` files (``generate --audio clip.wav``, a
        sample's ``.wav`` path). A ValueError for a clip the node cannot take (too short, too long).
        The default: no audio front end, a ConfigError naming the kind."""
        raise ConfigError(f"node kind '{self.config.builder}' ({type(self).__qualname__}) has no audio front end "
                          "(ModelBuilder.features_from_waveform): give the features it takes instead of a waveform")

    def synthetic_inputs(self, batch_size: int, generator: torch.Generator,
                         tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        """Random inputs for this node's ports that a graph binds to the batch (for demos and
        benchmarks); ``tokens`` gives the token counts arriving on its edge-fed ports."""
        raise NotImplementedError(f"{type(self).__name__} cannot make synthetic inputs")

    # --- export to MCore's MimoModel (mimo_builder._internal.interop) ---------------------------------

    mimo_roles: ClassVar[frozenset[str]] = frozenset()
    """Roles a node of this builder can take in an MCore MimoModel: 'encoder', 'projection'
    (an encoder's input projection), 'language'. Empty: the builder cannot be exported."""

    mimo_encoder_keywords: ClassVar[dict[str, str]] = {}
    """As a MIMO encoder: input port -> keyword of the module's forward (default: the port name)."""

    def mimo_problems(self, role: str) -> list[str]:
        """Why this node cannot take ``role`` in a MimoModel (empty when it can). Pure: checked
        before any process group exists; builders add their own reasons."""
        if role in self.mimo_roles:
            return []
        takes = ", ".join(sorted(self.mimo_roles)) or "no role"
        return [f"builder {type(self).__name__} cannot be exported to MIMO as {role} (it takes {takes})"]

    def check_mimo_role(self, role: str) -> None:
        """Raise a ConfigError with the first of :meth:`mimo_problems`."""
        problems = self.mimo_problems(role)
        if problems:
            raise ConfigError(problems[0])

    def mimo_spec(self, role: str, pg_collection: ProcessGroupCollection) -> ModuleSpec:
        """The MCore ModuleSpec MIMO builds for this node in ``role``, on ``pg_collection``. The
        built module must hold the same parameters, by name, as :meth:`build_model`'s."""
        self.check_mimo_role(role)
        raise NotImplementedError(f"{type(self).__name__} declares MIMO role {role!r} but defines no mimo_spec()")

    def mimo_special_token_ids(self) -> dict[str, int]:
        """As MIMO's language model: input port -> placeholder token id of that modality."""
        return {}

    def hf_mapping(self) -> "HFMapping | None":
        """How this node's parameters correspond to a Hugging Face model's tensors, for
        ``init: {hf: DIR}``, :func:`mimo_builder._internal.hf.load_hf` and :func:`mimo_builder._internal.hf.export_hf`;
        None (the default): the builder reads no Hugging Face weights. Pure (config only); raise
        :class:`mimo_builder._internal.hf.HFWeightsError` for configs no Hugging Face model matches."""
        return None

    def hf_mapping_for(self, hf_config: dict) -> "HFMapping | None":
        """The mapping that reads a Hugging Face folder whose config.json is ``hf_config``, for a
        builder whose config matches several Hugging Face model types (it picks by ``model_type``).
        Default: :meth:`hf_mapping`, whose ``model_type`` field check names a folder of another type."""
        return self.hf_mapping()

    def planned_tokens(self, tokens: dict[str, int]) -> int:
        """Tokens per sample this node computes on, for the plan's estimates, given the token
        counts arriving on its edge-fed ports. Default: the config's ``seq_length`` (every
        sample a full sequence), else the largest arriving count, else 1."""
        return getattr(self.config, "seq_length", None) or max(tokens.values(), default=None) or 1

    def stage_costs(self, config: TransformerConfig, micro_batch: int, tokens: dict[str, int]) -> list[StageCost]:
        """Activation bytes and FLOPs of one microbatch of ``micro_batch`` samples through each
        virtual pipeline stage (pp x vp, in layer order) of this node built with ``config`` (the
        TransformerConfig of its placement: TP/CP/PP sizes, dtype, recomputation); ``tokens`` as
        in :meth:`planned_tokens`. See :mod:`mimo_builder._internal.kinds.costs` for what is counted.

        The default, for builders that do not say: ``config.num_layers`` transformer layers with
        MCore's local (unfused, ``s^2``) attention, split evenly over the stages, no embedding or
        head. Builders of other layer kinds override it.
        """
        shape = layer_costs.Shape.of(config, micro_batch, self.planned_tokens(tokens))
        layer = layer_costs.transformer_layer_cost(shape, config, te=False)
        split = layer_costs.even_split(config.num_layers, layer_costs.virtual_stage_count(config))
        return [layer_costs.stage_cost(config, [layer] * count) for count in split]

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
