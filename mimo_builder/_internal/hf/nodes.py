"""``init: {hf: DIR}`` on graph nodes: checks at validation, loading after the walk, export."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from mimo_builder._internal.hf import files
from mimo_builder._internal.hf.convert import copy_weights, export_hf, folder_problems, mapping_of, shape_problems
from mimo_builder._internal.hf.mapping import HFShapeError, HFWeightsError, problem_text
from mimo_builder._internal.assembly.tp_shard import unwrap


def init_problems(name: str, builder, node) -> list[str]:
    """What keeps node ``name`` from starting from its ``init.hf`` folder (pure: no process
    group): a builder without a mapping, pipeline stages, config.json fields, unknown or missing
    tensors. Each problem names the node and the field."""
    where = f"node '{name}' init.hf"
    try:
        mapping_of(builder)
    except HFWeightsError as err:
        return [f"{where}: {err}"]
    vp = getattr(builder.config, "transformer", {}).get("virtual_pipeline_model_parallel_size") or 1
    if node.placement.pp * vp > 1:
        return [f"{where}: Hugging Face weights load into nodes on one pipeline stage; the node has "
                f"pp={node.placement.pp}, vp={vp}"]
    return folder_problems(builder, node.init.hf, where)


def load_hf_nodes(model) -> dict[str, str]:
    """Load every node whose document names ``init.hf`` (each hosting rank its TP and EP shard);
    returns node -> what it read (``24 tensors from hf:DIR (NemotronHForCausalLM)``). Collective
    over every rank: shape problems found on any rank raise :class:`HFShapeError` on all ranks
    before any weight is copied."""
    names = [n for n in model.valid.order if (init := model.valid.graph.nodes[n].init) and init.hf]
    if not names:
        return {}
    group = model.control
    problems = []
    for name in names:
        if model.hosts(name):
            module, pgs = unwrap(model.chunks(name)[0]), model.pg_collection(name)
            folder = model.valid.graph.nodes[name].init.hf
            mapping = mapping_of(model.valid.builders[name], files.read_config(folder))
            problems += shape_problems(module, mapping, folder, pgs, f"node '{name}' init.hf")
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problems, group=group)
    union = list(dict.fromkeys(p for ps in gathered for p in ps))
    if union:
        raise HFShapeError("init.hf does not fit:\n" + problem_text(union))
    for name in names:
        if model.hosts(name):
            folder = model.valid.graph.nodes[name].init.hf
            mapping = mapping_of(model.valid.builders[name], files.read_config(folder))
            copy_weights(unwrap(model.chunks(name)[0]), mapping, folder, model.pg_collection(name))
    return {name: _read(model.valid.builders[name], model.valid.graph.nodes[name].init.hf) for name in names}


def _read(builder, folder: str) -> str:
    """What a node reads from ``folder``: its tensor count and the folder's model class."""
    config = files.read_config(folder)
    model = (config.get("architectures") or [config.get("model_type", "?")])[0]
    return f"{len(mapping_of(builder, config).sources())} tensors from hf:{folder} ({model})"


def export_node(model, name: str, folder: str | Path) -> Path | None:
    """Write node ``name`` of a built graph in Hugging Face layout; call on every rank of the
    node (collective over its TP group). Returns the folder on the rank that wrote it."""
    if not model.hosts(name):
        return None
    return export_hf(model.chunks(name), model.valid.builders[name], folder, model.pg_collection(name))
