"""Whole-document validation of a Graph, before any process group or module exists.

Every problem found is collected (not only the first), each naming the node and the field and
saying how to fix it. A world size is optional here and required for placement checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx
import torch
from pydantic import ValidationError
from megatron.core.distributed import DistributedDataParallelConfig

from mimo_builder._internal.kinds.builder import ModelBuilder, Ports
from mimo_builder._internal.kinds.config import ModelConfig
from mimo_builder._internal.kinds.contract import class_name, run_problems, token_count_problem
from mimo_builder._internal.data.graph_tokenizer import graph_tokenizer, token_lookup, vocabulary_problems
from mimo_builder._internal.errors import ConfigError, GraphError, excerpt
from mimo_builder._internal.document.graph import Graph, parse_edge, parse_port_ref
from mimo_builder._internal.hf.nodes import init_problems as hf_init_problems
from mimo_builder._internal.document.options import check_options
from mimo_builder._internal.document.optimizer import OptimizerSettings
from mimo_builder._internal.placement import Layout
from mimo_builder._internal.kinds.loading import node_config
from mimo_builder._internal.kinds.registry import resolve_hook
from mimo_builder._internal.lora_checks import lora_problems

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A node name, matched whole (``fullmatch``: no trailing newline)."""

RESERVED_NAMES = frozenset(dir(torch.nn.ModuleDict()))
"""Names a node may not take: CompositeModel keeps the nodes in a ``torch.nn.ModuleDict`` keyed
by name, which refuses its own attributes (``training``, ``forward``, ``keys``, ...)."""


@dataclass(frozen=True)
class Edge:
    """A connection from one node's output port to another node's input port."""

    src: str
    src_port: str
    dst: str
    dst_port: str

    def __str__(self) -> str:
        return f"{self.src}.{self.src_port} -> {self.dst}.{self.dst_port}"


@dataclass
class ValidGraph:
    """A graph that passed validation, with everything resolved that building needs."""

    graph: Graph
    configs: dict[str, ModelConfig]
    builders: dict[str, ModelBuilder]
    edges: list[Edge]
    inputs: dict[str, tuple[str, str]]
    outputs: list[tuple[str, str]]
    order: list[str]
    world_size: int | None = None
    layouts: dict[str, Layout] = field(default_factory=dict)

    def ports(self, node: str) -> Ports:
        """The input and output ports of ``node``, as its builder declares them."""
        return self.builders[node].ports()

    def ddp_config(self, node: str, defaults: DistributedDataParallelConfig | None = None) -> DistributedDataParallelConfig:
        """The node's DDP config: graph-wide ``defaults`` overridden by the node's own options."""
        base = {} if defaults is None else {k: v for k, v in vars(defaults).items()
                                            if k in DistributedDataParallelConfig.__dataclass_fields__}
        return DistributedDataParallelConfig(**{**base, **self.graph.nodes[node].ddp})

    def optimizer_settings(self, node: str) -> OptimizerSettings:
        """The graph-wide optimizer settings with ``node``'s overrides applied."""
        return self.graph.optimizer.for_node(self.graph.nodes[node].optimizer)


def validate_graph(graph: Graph, world_size: int | None = None) -> ValidGraph:
    """Check the whole document; raise GraphError listing every problem, else return it resolved."""
    problems: list[str] = []
    if world_size is not None and world_size < 1:
        raise GraphError([f"world size must be >= 1, got {world_size}"])
    tokenizer = _tokenizer(graph, problems)
    configs, builders = _check_nodes(graph, problems, tokenizer)
    edges = _check_edges(graph, builders, problems)
    inputs, outputs = _check_bindings(graph, builders, edges, problems)
    texts = sorted({node for node, port in inputs.values() if port == "input_ids"})
    problems.extend(vocabulary_problems(graph, configs, texts[0] if len(texts) == 1 else None, tokenizer))
    problems.extend(_packing_problems(graph, configs, builders, inputs))
    order = _check_acyclic(graph, edges, problems)
    layouts = _check_layouts(graph, configs, world_size, problems) if world_size is not None else {}
    if layouts:
        _check_edge_dp(edges, layouts, problems)
        _check_edge_cp(edges, layouts, problems)
    if problems:
        raise GraphError(problems)
    return ValidGraph(graph, configs, builders, edges, inputs, outputs, order, world_size, layouts)


def _tokenizer(graph: Graph, problems: list[str]):
    try:
        return graph_tokenizer(graph)
    except ConfigError as err:
        problems.append(str(err))
        return None


def _check_nodes(graph: Graph, problems: list[str], tokenizer=None):
    configs, builders = {}, {}
    if not graph.nodes:
        problems.append("graph has no nodes: add at least one under 'nodes'")
    for name, node in graph.nodes.items():
        bad_name = _name_problems(name)
        if bad_name:
            problems.extend(bad_name)
            continue  # other messages would quote the bad name again
        try:
            configs[name] = node_config(node, where=f"node '{name}' config").with_token_ids(
                token_lookup(tokenizer, f"node '{name}' config"))
            builder = configs[name].make_builder()
            ports = _ports_of(name, builder)
            problems.extend(run_problems(name, builder, ports, node.placement.pp))
            problems.extend(f"node '{name}' {p}" for p in builder.training_problems(trains=not node.frozen))
            builders[name] = builder
            problems.extend(_expert_problems(name, node, configs[name]))
            problems.extend(lora_problems(name, node, builder, configs[name]))
        except ConfigError as err:
            problems.extend(str(err).splitlines())
        try:
            check_options(DistributedDataParallelConfig, node.ddp)
        except ValueError as err:
            problems.append(f"node '{name}' ddp: {err}")
        if node.ddp.get("use_megatron_fsdp") and not torch.cuda.is_available():
            problems.append(f"node '{name}' ddp.use_megatron_fsdp: Megatron-FSDP runs on CUDA devices only "
                            "(see docs/architecture.md, 'Megatron-FSDP'); use MCore DDP (the default) here")
        try:
            graph.optimizer.for_node(node.optimizer)
        except ValidationError as err:
            problems.append(f"node '{name}' optimizer: {err.errors()[0]['msg']}")
        if node.init is not None:
            init_problems = node.init.problems(name)
            if not init_problems and node.init.hf is not None and name in builders:
                init_problems = hf_init_problems(name, builders[name], node)
            elif not init_problems and node.init.checkpoint is not None:
                init_problems = _init_checkpoint_problems(name, node)
            problems.extend(init_problems)
        for which in ("pre_wrap", "post_wrap"):
            for i, hook in enumerate(getattr(node.hooks, which)):
                try:
                    resolve_hook(hook, where=f"node '{name}' hooks.{which}[{i}]")
                except ConfigError as err:
                    problems.append(str(err))
    return configs, builders


def _ports_of(name: str, builder: ModelBuilder) -> Ports:
    """``builder.ports()``, with any failure of the builder's own code named as the node's."""
    where = f"node '{name}': {class_name(type(builder))}.ports()"
    try:
        ports = builder.ports()
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{where} raised {type(err).__name__}: {err}") from err
    if not isinstance(ports, Ports):
        raise ConfigError(f"{where} returned {type(ports).__name__}; return Ports.of(inputs=[Port(...)], "
                          "outputs=[Port(...)])")
    return ports


def _name_problems(name: str) -> list[str]:
    if not NAME.fullmatch(name):
        return [f"node name {excerpt(name)} must be an identifier of at most 64 characters (letters, "
                "digits, '_'; no dots, spaces or newlines)"]
    if name in RESERVED_NAMES:
        return [f"node name {name!r} is reserved (an attribute of torch.nn.ModuleDict, which holds the "
                "built nodes); rename the node"]
    return []


def _init_checkpoint_problems(name: str, node) -> list[str]:
    """A project checkpoint named by ``init.checkpoint`` must hold the node, of the same builder,
    with its weights saved (its manifest only is read)."""
    from mimo_builder._internal.checkpoint import files

    where, source = f"node '{name}' init.checkpoint", node.init.checkpoint
    if not files.is_project_checkpoint(source):
        return []  # a unimodal Megatron-Core checkpoint: its tensors are checked when it loads
    try:
        manifest = files.read_manifest(files.resolve(source))
    except files.CheckpointError as err:
        return [f"{where}: {err}"]
    wanted = node.init.node or name
    record = manifest.nodes.get(wanted)
    if record is None:
        return [f"{where}: {source!r} holds no node '{wanted}' (it has {', '.join(manifest.nodes) or 'none'}); "
                "name the node to read with init.node"]
    if record.builder != node.builder:
        return [f"{where}: node '{wanted}' of {source!r} is a '{record.builder}' node, this one is '{node.builder}'"]
    if not record.saved or record.adapters_only:
        held = "LoRA adapters only" if record.saved else "no weights (it was frozen and not saved)"
        return [f"{where}: node '{wanted}' of {source!r} holds {held}; start from the checkpoint its base came from"]
    return []


def _packing_problems(graph: Graph, configs, builders, inputs) -> list[str]:
    """A node that packs its samples (its ``seq_lengths`` bound) runs them on one pipeline stage,
    without CP or sequence parallelism: packed rows change in number from step to step."""
    why = "a node packing its samples (inputs bind its seq_lengths) runs with"
    problems = []
    for name in sorted({node for node, port in inputs.values() if port == "seq_lengths" and node in builders}):
        placement = graph.nodes[name].placement
        problems += [f"node '{name}' placement.{axis}: {why} {axis} 1, got {getattr(placement, axis)}"
                     for axis in ("pp", "cp") if getattr(placement, axis) > 1]
        if getattr(configs[name], "transformer", {}).get("sequence_parallel"):
            problems.append(f"node '{name}' config.transformer.sequence_parallel: {why}out it")
        problems += [f"node '{name}' {p}" for p in builders[name].packing_problems()]
    return problems


def _expert_problems(name: str, node, config: ModelConfig) -> list[str]:
    """placement.ep / etp above 1 split expert layers: refused on a node that has none."""
    if config.has_experts():
        ep = node.placement.ep
        return [f"node '{name}' placement.ep: {e}" for e in config.ep_problems(ep)] \
            if ep > 1 and hasattr(config, "ep_problems") else []
    sizes = {"ep": node.placement.ep, "etp": node.placement.etp or 1}
    return [f"node '{name}' placement.{field}: {size} splits expert (MoE) layers, but this "
            f"{type(config).__name__} has none; remove placement.{field} (or set it to 1)"
            for field, size in sizes.items() if size > 1]


def _check_edges(graph: Graph, builders: dict, problems: list[str]) -> list[Edge]:
    edges, fed = [], {}
    for i, text in enumerate(graph.edges):
        try:
            (src, sport), (dst, dport) = parse_edge(text)
        except ValueError as err:
            problems.append(f"edges[{i}]: {err}")
            continue
        edge = Edge(src, sport, dst, dport)
        ok = _port_exists(src, sport, "outputs", builders, graph, f"edge '{edge}'", problems)
        ok &= _port_exists(dst, dport, "inputs", builders, graph, f"edge '{edge}'", problems)
        if ok:
            _check_features(edge, builders, problems)
            if "tokens" in builders[dst].ports().inputs[dport].dims:
                problems.extend(filter(None, [token_count_problem(edge, builders[src])]))
        if (dst, dport) in fed:
            problems.append(f"edge '{edge}': {dst}.{dport} is already fed by '{fed[(dst, dport)]}'; "
                            "an input port takes one edge")
        fed[(dst, dport)] = edge
        edges.append(edge)
    return edges


def _port_exists(node, port, side, builders, graph, where, problems) -> bool:
    if node not in graph.nodes:
        problems.append(f"{where}: unknown node {excerpt(node)}; nodes are {sorted(graph.nodes)}")
        return False
    if node not in builders:
        return False  # its config error is already reported
    ports = getattr(builders[node].ports(), side)
    if port not in ports:
        kind = "output" if side == "outputs" else "input"
        problems.append(f"{where}: node '{node}' has no {kind} port {port!r}; its {kind}s are {sorted(ports)}")
        return False
    return True


def _check_features(edge: Edge, builders, problems):
    out = builders[edge.src].ports().outputs[edge.src_port]
    inp = builders[edge.dst].ports().inputs[edge.dst_port]
    if out.features is not None and inp.features is not None and out.features != inp.features:
        problems.append(f"edge '{edge}': {edge.src}.{edge.src_port} has {out.features} features but "
                        f"{edge.dst}.{edge.dst_port} expects {inp.features}; make the sizes match "
                        "(e.g. a projector's input_size/output_size)")


def _check_bindings(graph: Graph, builders, edges, problems):
    inputs, outputs = {}, []
    fed = {(e.dst, e.dst_port) for e in edges}
    for key, ref in graph.inputs.items():
        found = _port_ref(ref, "inputs", builders, graph, f"inputs.{key}", problems)
        if found is not None:
            if found in fed:
                problems.append(f"inputs.{key}: {ref} is already fed by an edge; bind it once")
            inputs[key] = found
    first: dict[tuple[str, str], int] = {}
    for i, ref in enumerate(graph.outputs):
        found = _port_ref(ref, "outputs", builders, graph, f"outputs[{i}]", problems)
        if found in first:
            problems.append(f"outputs[{i}]: {'.'.join(found)} is already outputs[{first[found]}]; list each "
                            "output once (a loss listed twice would count twice)")
        elif found is not None:
            first[found] = i
            outputs.append(found)
    bound = fed | set(inputs.values())
    for name, builder in builders.items():
        for port in builder.ports().inputs.values():
            if port.required and (name, port.name) not in bound:
                problems.append(f"node '{name}': required input port {port.name!r} is unbound; "
                                f"add an edge into '{name}.{port.name}' or bind a batch key under 'inputs'")
    return inputs, outputs


def _port_ref(ref, side, builders, graph, where, problems) -> tuple[str, str] | None:
    """(node, port) for a 'node.port' reference that exists on ``side``, else None (problem noted)."""
    try:
        node, port = parse_port_ref(ref)
    except ValueError as err:
        problems.append(f"{where}: {err}")
        return None
    return (node, port) if _port_exists(node, port, side, builders, graph, where, problems) else None


def _check_acyclic(graph: Graph, edges: list[Edge], problems: list[str]) -> list[str]:
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((e.src, e.dst) for e in edges if e.src in graph.nodes and e.dst in graph.nodes)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        index = {name: i for i, name in enumerate(graph.nodes)}
        return list(nx.lexicographical_topological_sort(dag, key=index.__getitem__))
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    problems.append(f"edges form a cycle {path}; a graph must be acyclic (remove one of these edges)")
    return list(graph.nodes)


def _check_layouts(graph: Graph, configs, world_size: int, problems: list[str]) -> dict[str, Layout]:
    layouts = {}
    for name, node in graph.nodes.items():
        p = node.placement
        if p.offset >= world_size:
            problems.append(f"node '{name}' placement.offset {p.offset} is beyond the world size {world_size}; "
                            f"{_beyond_hint(graph, world_size)}")
            continue
        layout = p.layout(world_size)
        if layout.offset + layout.size > world_size:
            problems.append(f"node '{name}' placement: ranks {layout.offset}..{layout.offset + layout.size - 1} "
                            f"go beyond the world size {world_size}; lower offset or size, "
                            f"{_beyond_hint(graph, world_size)}")
            continue
        errors = layout.problems()
        problems.extend(f"node '{name}' placement: {e}" for e in errors)
        if errors:
            continue  # e.g. tp above the node's ranks: no data-parallel size to check edges with
        if name in configs:
            problems.extend(f"node '{name}' placement.tp: {e}" for e in _tp_problems(configs[name], layout.tp))
            problems.extend(f"node '{name}' placement.pp: {e}" for e in _pp_problems(configs[name], layout.pp))
            problems.extend(f"node '{name}' placement.cp: {e}" for e in _cp_problems(configs[name], layout))
        layouts[name] = layout
    return layouts


def _beyond_hint(graph: Graph, world_size: int) -> str:
    """The two other ways out of a placement beyond the world: the ranks the placements ask for, or
    ``--colocate`` (:meth:`Graph.colocated`)."""
    needed = max(p.offset + (p.size or 1) for p in (n.placement for n in graph.nodes.values()))
    return f"run on {needed} ranks, or add --colocate to put every node on the {world_size} ranks"


def _tp_problems(config, tp: int) -> list[str]:
    return config.tp_problems(tp) if hasattr(config, "tp_problems") else []


def _pp_problems(config, pp: int) -> list[str]:
    return config.pp_problems(pp) if hasattr(config, "pp_problems") else []


def _cp_problems(config, layout: Layout) -> list[str]:
    """Context parallelism needs a config that splits its sequences (``cp_problems``)."""
    if layout.cp == 1:
        return []
    if not hasattr(config, "cp_problems"):
        return [f"{layout.cp} splits sequences over context-parallel ranks, which {type(config).__name__} "
                "does not support; set cp to 1"]
    return config.cp_problems(layout.cp, layout.tp)


def _check_edge_cp(edges: list[Edge], layouts: dict[str, Layout], problems: list[str]):
    """A node with cp > 1 holds part of each sequence: its outputs cannot feed other nodes."""
    for edge in edges:
        if edge.src in layouts and layouts[edge.src].cp > 1:
            problems.append(f"edge '{edge}': node '{edge.src}' has placement.cp {layouts[edge.src].cp} (each rank "
                            "holds part of every sequence), so its outputs cannot feed another node; only "
                            "graph outputs (its loss) leave it")


def _check_edge_dp(edges: list[Edge], layouts: dict[str, Layout], problems: list[str]):
    for edge in edges:
        if edge.src not in layouts or edge.dst not in layouts:
            continue
        a, b = layouts[edge.src].dp, layouts[edge.dst].dp
        if a % b and b % a:
            problems.append(f"edge '{edge}': data-parallel sizes {a} ({edge.src}) and {b} ({edge.dst}) "
                            "do not divide each other; the batch cannot be split between them")
