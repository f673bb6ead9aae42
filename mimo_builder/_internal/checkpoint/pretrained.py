"""Start nodes from pretrained weights named in the graph document (``init: {checkpoint: DIR}``).

Each source is either a project checkpoint (a node's weights under its name, as
:class:`~mimo_builder._internal.checkpoint.checkpointer.Checkpointer` writes them) or a unimodal
Megatron-Core checkpoint (one model's ``sharded_state_dict``, keys under ``init.prefix``).
Only the named node is read, under whatever placement it has now: MCore's keys are global.
Every rank takes part in each source's load, in document order, so nodes on disjoint ranks
load together without waiting on each other.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from mimo_builder._internal.checkpoint import files, state
from mimo_builder._internal.checkpoint.checks import raise_if_any, shape_problems
from mimo_builder._internal.checkpoint.safe_load import safe_unpickling
from mimo_builder._internal.assembly.lora import is_adapter_key


def load_initial_weights(model) -> dict[str, str]:
    """Load every node whose document names ``init.checkpoint`` or ``init.hf``; returns node ->
    what was loaded (``from checkpoint DIR``, ``24 tensors from hf:DIR (ARCHITECTURE)``).

    Collective over all ranks. Errors (a missing tensor, another shape) name the node and the
    source and are raised on every rank before any weight is copied.
    """
    sources: dict[Path, list[str]] = {}
    for name in model.valid.order:
        init = model.valid.graph.nodes[name].init
        if init is not None and init.checkpoint is not None:
            sources.setdefault(_step_dir(init.checkpoint), []).append(name)
    group = model.control if sources else None
    for step_dir, names in sources.items():  # the same order on every rank
        _load_source(model, step_dir, names, group)
    from mimo_builder._internal.hf.nodes import load_hf_nodes  # init: {hf: DIR}

    loaded = {name: f"weights from checkpoint {step_dir}" for step_dir, names in sources.items() for name in names}
    return {**loaded, **load_hf_nodes(model)}


def _step_dir(checkpoint: str) -> Path:
    return files.resolve(checkpoint) if files.is_project_checkpoint(checkpoint) else Path(checkpoint)


def _load_source(model, step_dir: Path, names: list[str], group) -> None:
    project = (step_dir / files.MANIFEST).is_file()
    tree, owner = {}, {}
    for name in names:
        if not model.hosts(name):
            continue
        init = model.valid.graph.nodes[name].init
        prefix = f"{init.node or name}." if project else init.prefix
        owner[prefix] = name
        base_only = _not_adapter if model.valid.graph.nodes[name].lora is not None else None
        tree[name] = state.model_state(model.chunks(name), model.pg_collection(name), prefix, base_only)
    flat = state.sharded_leaves(tree)

    def describe(key: str) -> tuple[str, str]:
        prefix = next((p for p in owner if key.startswith(p)), "")
        return owner.get(prefix, names[0]), f" (init.checkpoint {str(step_dir)!r})"

    with safe_unpickling():
        raise_if_any(group, shape_problems(flat, step_dir, describe), title="init.checkpoint does not fit")
        loaded = dist_checkpointing.load(flat, str(step_dir))
    state.fill(tree, loaded)
    for name, model_state in tree.items():
        state.load_model(model.chunks(name), model_state, partial=model.valid.graph.nodes[name].lora is not None)


def _not_adapter(key: str) -> bool:
    """A LoRA node's base weights come from its init source; its adapters start fresh."""
    return not is_adapter_key(key)
