"""What a node kind must define, checked before anything is built.

A node kind is a :class:`~mimo_builder._internal.kinds.config.ModelConfig` subclass (its fields) and a
:class:`~mimo_builder._internal.kinds.builder.ModelBuilder` subclass that names it in ``config_class`` and defines
``ports()`` and ``build_model()``; ``run()`` unless it has exactly one input and one output port;
``run_stage()`` to run with pp > 1; ``output_tokens()`` when an output feeds a port with a
``tokens`` axis; ``synthetic_inputs()`` for ``mimo-builder run`` when the batch feeds it.
Each check here returns sentences naming the class and the missing piece, so validation reports
them with the node instead of a ``TypeError`` traceback at build time.
"""

from __future__ import annotations

from mimo_builder._internal.errors import ConfigError

REQUIRED = {
    "ports": "ports() -> Ports: its named inputs and outputs",
    "build_model": "build_model(pg_collection, pre_process=None, post_process=None, vp_stage=None): "
                   "one torch.nn.Module (a MegatronModule or a plain module) on the node's groups",
}


def class_name(cls: type) -> str:
    """``module:Qualname`` of a class, as documents name it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def builder_base(cls: type) -> type | None:
    """mimo_builder's ModelBuilder among ``cls``'s bases (itself included), found by the marker it
    carries (``__mimo_builder_base__``), or None: this module and the registry check builder
    classes without importing the builder module, which imports the configs they resolve."""
    return next((c for c in getattr(cls, "__mro__", ()) if c.__dict__.get("__mimo_builder_base__")), None)


def defines(builder: object, method: str) -> bool:
    """Whether ``builder``'s class (or a base other than ModelBuilder) defines ``method``."""
    cls = builder if isinstance(builder, type) else type(builder)
    return getattr(cls, method) is not getattr(builder_base(cls), method)


def builder_class_problems(cls: type, ref: str) -> list[str]:
    """Why the builder class ``cls`` (named ``ref``) cannot make nodes: abstract methods left,
    no config class of its own."""
    named = ref if ref == class_name(cls) else f"{ref} ({class_name(cls)})"
    problems = []
    for method in sorted(getattr(cls, "__abstractmethods__", ())):
        what = REQUIRED.get(method, f"{method}()")
        problems.append(f"builder {named} does not define {method}(); a node kind defines {what}")
    base_config = builder_base(cls).config_class  # ModelConfig
    config_class = getattr(cls, "config_class", None)
    if not (isinstance(config_class, type) and issubclass(config_class, base_config)):
        problems.append(f"builder {named}: config_class is {config_class!r}, not a ModelConfig subclass")
    elif config_class is base_config:
        problems.append(f"builder {named} does not set config_class; define 'class MyConfig(ModelConfig)' "
                        "with the node's fields and set config_class = MyConfig")
    return problems


def run_problems(node: str, builder, ports, pp: int) -> list[str]:
    """``run()`` where the default (one input, one output) does not serve; ``run_stage()`` for pp > 1."""
    cls = type(builder)
    problems = []
    if (len(ports.inputs) != 1 or len(ports.outputs) != 1) and not (defines(cls, "run") or defines(cls, "run_stage")):
        problems.append(f"node '{node}': builder {class_name(cls)} does not define run(); the default serves "
                        f"one input and one output, its ports are {sorted(ports.inputs)} -> {sorted(ports.outputs)}. "
                        "Define run(self, model, inputs) returning a dict of output tensors")
    if pp > 1 and not defines(cls, "run_stage"):
        problems.append(f"node '{node}' placement.pp: {pp} splits the node into pipeline stages, but builder "
                        f"{class_name(cls)} does not define run_stage(); set pp to 1 or define run_stage()")
    return problems


def token_count_problem(edge, builder) -> str | None:
    """An output feeding a port with a ``tokens`` axis needs its builder's ``output_tokens()``."""
    if defines(builder, "output_tokens"):
        return None
    return (f"edge '{edge}': {edge.dst}.{edge.dst_port} has a 'tokens' axis, but builder "
            f"{class_name(type(builder))} of node '{edge.src}' does not define output_tokens(); define "
            f"output_tokens(self, input_tokens) returning {{{edge.src_port!r}: number of tokens}} "
            "(e.g. the number of patches), so placeholder tokens can be counted")


def output_tokens_of(node: str, builder, input_tokens: dict[str, int]) -> dict[str, int]:
    """``builder.output_tokens(input_tokens)``; a count the builder refuses is an error naming ``node``."""
    try:
        return builder.output_tokens(input_tokens)
    except ConfigError as err:
        raise ConfigError(f"node '{node}': {err}") from None


def synthetic_problems(node: str, builder, bound_ports: list[str]) -> list[str]:
    """Nodes the batch feeds must make random inputs for ``mimo-builder run``."""
    if not bound_ports or defines(builder, "synthetic_inputs"):
        return []
    return [f"node '{node}': builder {class_name(type(builder))} does not define synthetic_inputs(), which "
            f"'run' needs for its batch-bound ports {sorted(bound_ports)}; define "
            "synthetic_inputs(self, batch_size, generator, tokens) returning a tensor per port"]
