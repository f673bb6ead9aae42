"""Helpers of the Hugging Face tests: a node's builder from its config, a folder's copy with
config.json fields changed (no process group: configs and headers only)."""

from __future__ import annotations

import json
import shutil


def builder_of(config: dict):
    """The builder of a node config dict (``builder`` included)."""
    from mimo_builder._internal.kinds.config import ModelConfig

    return ModelConfig.from_dict(config).make_builder()


def edited_folder(source, tmp_path, **fields):
    """A copy of the model folder ``source`` under ``tmp_path`` with ``fields`` set in its config.json."""
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **fields}))
    return folder


def assert_same_exports(root, nodes, tp: int = 2) -> None:
    """Each node's export at TP ``tp`` (``root/export_tp{tp}/<node>``) holds its TP1 export's tensors, bitwise."""
    import torch
    from safetensors.torch import load_file

    for node in nodes:
        want = load_file(f"{root}/export_tp1/{node}/model.safetensors")
        got = load_file(f"{root}/export_tp{tp}/{node}/model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), node
