"""The graph document: named nodes (config, placement, DDP options), edges, inputs, outputs.

Declared in Python::

    Graph().add("vision", VisionConfig(...), placement=Placement(offset=0, size=2))
           .add("lm", MambaConfig(...), placement=Placement(offset=2, size=2, tp=2))
           .connect("vision.embeddings", "lm.image")
           .bind("pixel_values", "vision.pixel_values").output("lm.loss")

or in YAML/JSON with the same content (``Graph.from_yaml``). The document is plain data;
:mod:`mimo_builder._internal.validation` checks it as a whole before anything is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mimo_builder._internal.document.types import HookRef, NonNegativeInt, PositiveInt, StrictBool, describe_errors
from mimo_builder._internal.document.files import parse_json, parse_yaml
from mimo_builder._internal.errors import ConfigError, excerpt
from mimo_builder._internal.document.tokenizer import TokenizerSpec
from mimo_builder._internal.document.optimizer import NodeOptimizer, OptimizerSettings
from mimo_builder._internal.document.layout import Layout, fit_to_world

ARROW = "->"
DOCUMENT_SUFFIXES = (".yaml", ".yml", ".json")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Placement(_Strict):
    """Which ranks a node lives on and how they are split. ``dp`` is derived: size / (tp*pp*cp)."""

    offset: NonNegativeInt = 0
    """First global rank of the node's contiguous range."""

    size: PositiveInt | None = None
    """Number of ranks (None: every rank from offset to the end of the world)."""

    tp: PositiveInt = 1
    """Tensor-parallel size."""

    pp: PositiveInt = 1
    """Pipeline-parallel size."""

    cp: PositiveInt = 1
    """Context-parallel size."""

    ep: PositiveInt = 1
    """Expert-parallel size (MoE layers)."""

    etp: PositiveInt | None = None
    """Expert tensor-parallel size (None: same as tp)."""

    def layout(self, world_size: int) -> Layout:
        """The concrete rank layout in a world of ``world_size`` ranks."""
        size = self.size if self.size is not None else world_size - self.offset
        return Layout(self.offset, size, self.tp, self.cp, self.pp, self.ep, self.etp or 0)

    def colocated(self, world_size: int, node: str) -> "Placement":
        """This placement spread over all ``world_size`` ranks (:func:`fit_to_world`);
        ConfigError names ``node`` and the field that cannot fit."""
        declared = dict(tp=self.tp, cp=self.cp, pp=self.pp, ep=self.ep, etp=self.etp)
        sizes, problems = fit_to_world(declared, world_size)
        if problems:
            raise ConfigError("\n".join(f"node '{node}' placement.{field}: {text}" for field, text in problems))
        return Placement(tp=sizes["tp"], cp=sizes["cp"], pp=sizes["pp"], ep=sizes["ep"],
                         etp=sizes["etp"] if self.etp is not None else None)


class Hooks(_Strict):
    """Wrap hooks added to the node's own config hooks (run after them, in declared order)."""

    pre_wrap: list[HookRef] = Field(default_factory=list)
    """Run on the model chunks before mixed-precision and DDP wrapping."""

    post_wrap: list[HookRef] = Field(default_factory=list)
    """Run on the wrapped chunks."""


class NodeInit(_Strict):
    """Where a node's starting weights come from, instead of its seeded initialisation."""

    checkpoint: str | None = None
    """A project checkpoint (root or step folder) or a unimodal Megatron-Core checkpoint folder;
    loaded under whatever placement the node has now."""

    node: str | None = None
    """In a project checkpoint, the node to read (default: this node's name)."""

    prefix: str = ""
    """In a unimodal Megatron-Core checkpoint, the key prefix of the model's tensors."""

    hf: str | None = None
    """A Hugging Face model folder (config.json + safetensors), read through the node's builder's
    ``hf_mapping()`` and sharded to the node's TP; the rest of the node is checked at validation."""

    def problems(self, node: str) -> list[str]:
        """What is wrong with this source, naming the node and field (checks the filesystem)."""
        import pathlib

        where = f"node '{node}' init"
        if self.hf is not None:
            if self.checkpoint is not None or self.node is not None or self.prefix:
                return [f"{where}: hf and checkpoint (node, prefix) are two sources; name one"]
            return []  # the folder and its fit are checked with the builder (mimo_builder._internal.hf)
        if self.checkpoint is None:
            return [f"{where}: name a source (checkpoint: DIR or hf: DIR)"]
        path = pathlib.Path(self.checkpoint)
        if not path.is_dir():
            return [f"{where}.checkpoint: {self.checkpoint!r} is not a folder"]
        if not any((path / f).is_file() for f in ("mimo.json", "latest", "metadata.json")):
            return [f"{where}.checkpoint: {self.checkpoint!r} holds neither a project checkpoint "
                    "(mimo.json or latest) nor a Megatron-Core one (metadata.json)"]
        return []


class NodeLora(_Strict):
    """LoRA adapters on the node's linear layers: ``y = W x + alpha / rank * B A x``. The base
    weights are frozen (they come from ``init:`` or the seed); only the adapters train and are
    checkpointed. See :mod:`mimo_builder._internal.assembly.lora`."""

    rank: PositiveInt
    """Inner size of each adapter (A is rank x in, B is out x rank)."""

    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Scale numerator: the update is ``alpha / rank * B A x`` (None: alpha = rank, scale 1)."""

    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    """Dropout on the adapters' input while training."""

    targets: list[str] | None = None
    """Megatron-Core linear layers to adapt, by module name (``linear_qkv``, ``linear_proj``,
    ``linear_fc1``, ``linear_fc2``, ``in_proj``, ``out_proj``, ...); None: every linear layer of
    the node's blocks (not the output layer, not MoE experts)."""

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class Node(_Strict):
    """One named module of the graph."""

    builder: str
    """Registered builder name (e.g. 'mamba') or 'module:Class' under the allowlist."""

    config: dict[str, Any] = Field(default_factory=dict)
    """The builder's config fields (validated against its config class)."""

    placement: Placement = Field(default_factory=Placement)
    """Ranks and parallel layout; omitted means all ranks, no model parallelism."""

    ddp: dict[str, Any] = Field(default_factory=dict)
    """DistributedDataParallelConfig options for this node, over the graph-wide defaults."""

    frozen: StrictBool = False
    """No gradients, no DDP gradient buffers, no optimizer for this node."""

    optimizer: NodeOptimizer = Field(default_factory=NodeOptimizer)
    """This node's overrides of the graph-wide optimizer settings (lr, min_lr, weight_decay)."""

    hooks: Hooks = Field(default_factory=Hooks)
    """Extra pre/post-wrap hooks for this node."""

    init: NodeInit | None = None
    """Start from these weights (e.g. a pretrained encoder) instead of the seeded initialisation."""

    lora: NodeLora | None = None
    """Fine-tune with LoRA adapters: the node's base weights frozen, adapters trained."""
    batch_microbatches: StrictBool = True
    """Where this node shares its ranks with a node downstream (an encoder colocated with its
    backbone), run its forward once over all microbatches of a step and its backward once after
    the last downstream backward (false: microbatch by microbatch, interleaved)."""
    balance_items: StrictBool = True
    """Where the batch gives this node ragged items (lists of images or clips per sample) and its
    data-parallel size is above 1, spread each microbatch's items over its DP ranks by cost and
    send their embeddings back to the ranks that own their samples (false: each DP rank encodes
    its own samples' items)."""


class Graph(_Strict):
    """A DAG of named nodes; edges connect output ports to input ports."""

    nodes: dict[str, Node] = Field(default_factory=dict)
    """Nodes by name."""

    edges: list[str] = Field(default_factory=list)
    """'src.port -> dst.port' connections."""

    inputs: dict[str, str] = Field(default_factory=dict)
    """Batch key -> 'node.port' it feeds."""

    outputs: list[str] = Field(default_factory=list)
    """'node.port' values the graph returns (losses are summed for training)."""

    hooks: Hooks = Field(default_factory=Hooks)
    """Graph-wide hooks: pre_wrap runs on every node's chunks, post_wrap on [CompositeModel]."""

    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    """Optimizer, learning-rate schedule, clipping and non-finite policy for every trainable node."""

    tokenizer: TokenizerSpec | None = None
    """The text's tokenizer ({hf: DIR} or {bytes: {}}): data, generate and export use it unless
    the data brings its own; validate checks the text node's vocab_size against it."""

    # --- declaring in Python ----------------------------------------------------------------

    def add(self, name: str, config: BaseModel | Mapping[str, Any], *, placement: Placement | Mapping | None = None,
            ddp: Mapping[str, Any] | None = None, frozen: bool = False,
            hooks: Hooks | Mapping | None = None, optimizer: NodeOptimizer | Mapping | None = None,
            init: NodeInit | Mapping | None = None, lora: NodeLora | Mapping | None = None) -> "Graph":
        """Add a node from a ModelConfig (or a dict with 'builder'); returns self to chain."""
        if name in self.nodes:
            raise ConfigError(f"node {name!r} is already in the graph")
        if isinstance(config, BaseModel):  # a ModelConfig (mimo_builder._internal.kinds.config)
            data = {**_explicit_fields(config), "builder": config.builder}
        else:
            data = dict(config)
        builder = data.pop("builder", None)
        if builder is None:
            raise ConfigError(f"node {name!r}: the config must name its builder")
        self.nodes[name] = Node(builder=builder, config=data, placement=placement or Placement(),
                                ddp=dict(ddp or {}), frozen=frozen, hooks=hooks or Hooks(),
                                optimizer=optimizer or NodeOptimizer(), init=init, lora=lora)
        return self

    def connect(self, src: str, dst: str) -> "Graph":
        """Feed output port ``src`` ('node.port') into input port ``dst``."""
        self.edges.append(f"{src} {ARROW} {dst}")
        return self

    def bind(self, batch_key: str, dst: str) -> "Graph":
        """Feed ``batch[batch_key]`` into input port ``dst``."""
        self.inputs[batch_key] = dst
        return self

    def output(self, ref: str) -> "Graph":
        """Return output port ``ref`` from a forward pass."""
        self.outputs.append(ref)
        return self

    # --- files ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "graph") -> "Graph":
        """A graph from plain data, every problem named by its place under ``where``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with nodes/edges/inputs/outputs, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(describe_errors(cls, err, where)) from None

    @classmethod
    def from_yaml(cls, text: str, where: str = "graph") -> "Graph":
        """Parse with safe YAML only, refusing duplicate keys and alias bombs (:mod:`mimo_builder._internal.document.files`)."""
        return cls.from_dict(parse_yaml(text, where), where)

    @classmethod
    def from_json(cls, text: str, where: str = "graph") -> "Graph":
        """Parse JSON, refusing duplicate keys."""
        return cls.from_dict(parse_json(text, where), where)

    def colocated(self, world_size: int) -> "Graph":
        """Every node on all ``world_size`` ranks (``--colocate``): any graph on fewer ranks, e.g.
        one GPU. Each node keeps its tp/cp/pp/ep/etp where they divide the world and shrinks
        those larger than it (:meth:`Placement.colocated`); :func:`colocation_changes` lists what
        changed."""
        return self.model_copy(update={"nodes": {
            name: node.model_copy(update={"placement": node.placement.colocated(world_size, name)})
            for name, node in self.nodes.items()}})

    def packed(self) -> "Graph":
        """A copy whose batch also binds ``seq_lengths`` to the node the batch feeds ``input_ids``
        (``run --pack``): that node then packs its samples several to a row."""
        nodes = sorted({parse_port_ref(ref)[0] for ref in self.inputs.values() if ref.endswith(".input_ids")})
        if len(nodes) != 1:
            raise ConfigError(f"--pack: packing needs exactly one node whose input_ids the batch feeds, found "
                              f"{nodes or 'none'}")
        if f"{nodes[0]}.seq_lengths" in self.inputs.values():
            return self.model_copy(deep=True)
        if "seq_lengths" in self.inputs:
            raise ConfigError(f"--pack: the batch key 'seq_lengths' is already bound to {self.inputs['seq_lengths']}")
        return self.model_copy(update={"inputs": {**self.inputs, "seq_lengths": f"{nodes[0]}.seq_lengths"}}, deep=True)

    def as_dict(self) -> dict[str, Any]:
        """The document as plain data, without fields left at their defaults."""
        return _explicit_fields(self, mode="json")

    def to_yaml(self) -> str:
        """The document as YAML (fields left at their defaults omitted)."""
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def to_json(self, indent: int | None = 2) -> str:
        """The document as JSON (fields left at their defaults omitted)."""
        return json.dumps(self.as_dict(), indent=indent)


def colocation_changes(before: Graph, after: Graph) -> list[str]:
    """The parallel sizes :meth:`Graph.colocated` changed, one line per node."""
    out = []
    for name, node in before.nodes.items():
        old, new = node.placement, after.nodes[name].placement
        changed = [f"{f} {getattr(old, f)} -> {getattr(new, f)}" for f in ("tp", "cp", "pp", "ep", "etp")
                   if getattr(old, f) != getattr(new, f)]
        if changed:
            out.append(f"node '{name}': {', '.join(changed)}")
    return out


def parse_port_ref(ref: str) -> tuple[str, str]:
    """'node.port' -> (node, port); raises ValueError with the expected form."""
    node, sep, port = ref.strip().partition(".")
    if not sep or not node or not port:
        raise ValueError(f"{excerpt(ref)} is not 'node.port'")
    return node, port


def parse_edge(edge: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """'a.out -> b.in' -> ((a, out), (b, in))."""
    src, sep, dst = edge.partition(ARROW)
    if not sep:
        raise ValueError(f"edge {excerpt(edge)} is not 'src.port -> dst.port'")
    return parse_port_ref(src), parse_port_ref(dst)


def _explicit_fields(model: BaseModel, mode: str = "python") -> dict[str, Any]:
    """``model`` dumped without the fields (recursively) that equal their defaults."""
    out = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if not info.is_required() and value == info.get_default(call_default_factory=True):
            continue
        if isinstance(value, BaseModel):
            out[name] = _explicit_fields(value, mode)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            out[name] = {k: _explicit_fields(v, mode) for k, v in value.items()}
        else:
            out[name] = model.__pydantic_serializer__.to_python(model, mode=mode, include={name})[name]
    return out
