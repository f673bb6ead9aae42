"""mimo-builder: compose multi-module models on Megatron-Core, one graph of per-node builders.

The names below are the public surface: ``from mimo_builder import Graph, build, train``. They
load on first use, so ``import mimo_builder`` imports neither torch nor Megatron-Core. Node kinds
are written against :mod:`mimo_builder.kinds`; the shipped kinds' configs are in :mod:`submodels`.
Everything under ``mimo_builder._internal`` is private.
"""

from mimo_builder._internal.lazy import LazyNames
from mimo_builder._internal.moved import install_moved_modules
from mimo_builder._internal.platform.environment import prepare_before_megatron, quiet_import_notices

quiet_import_notices()  # before anything imports MCore: importing the library prints nothing
prepare_before_megatron()  # mamba-ssm's import attempt must precede MCore's Mamba modules
install_moved_modules()  # the module paths of 0.1 still import for one minor version, with a warning

_I = "mimo_builder._internal."
_PUBLIC = LazyNames(__name__, {
    # declaring a graph
    "Graph": _I + "document.graph", "Placement": _I + "document.graph", "OptimizerSettings": _I + "document.optimizer",
    "load_graph": _I + "kinds.loading", "validate": _I + "validation:validate_graph", "ValidGraph": _I + "validation",
    "allow_modules": _I + "kinds.registry",
    # building and training
    "build": _I + "api", "CompositeModel": _I + "assembly.walker", "CompositeBuilder": _I + "assembly.walker",
    "train": _I + "runtime.train", "TrainOptions": _I + "runtime.train",
    "GraphSchedule": _I + "runtime.schedule", "GraphOptimizer": _I + "runtime.optim",
    "synthetic_batch": _I + "runtime.synthetic", "launch": _I + "platform.launch",
    "Checkpointer": _I + "checkpoint.checkpointer",
    "generate": _I + "runtime.generation", "GenerationOptions": _I + "runtime.generation",
    # data
    "GraphData": _I + "data.spec", "GraphCollator": _I + "data.collate", "RankLoader": _I + "data.loader",
    "SampleSource": _I + "data.loader", "IndexedSource": _I + "data.loader",
    "HFTokenizer": _I + "data.tokenizer", "ByteTokenizer": _I + "data.tokenizer",
    "EnergonSource": _I + "data.energon", "caption_sample": _I + "data.energon",
    "vqa_sample": _I + "data.energon", "interleaved_sample": _I + "data.energon",
    "LlavaDataset": _I + "data.llava", "train_chat_tokenizer": _I + "data.chat_tokenizer",
    "conversation_ids": _I + "data.conversation", "Items": _I + "runtime.items",
    # weights in and out
    "to_mimo_model": _I + "interop.export", "mimo_forward_inputs": _I + "interop.export",
    "export_node": _I + "hf.nodes", "merge_lora": _I + "assembly.lora",
    # planning
    "make_plan": _I + "planning.plan",
    # errors
    "MimoError": _I + "errors", "ConfigError": _I + "errors", "GraphError": _I + "errors",
    "DependencyError": _I + "errors", "DataError": _I + "errors", "BuildError": _I + "assembly.walker",
    "CheckpointError": _I + "checkpoint.files",
})

__all__ = sorted(_PUBLIC.names) + ["__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("mimo-builder")
    return _PUBLIC.get(name)


def __dir__() -> list[str]:
    return sorted({*_PUBLIC.dir(globals()), "__version__"})
