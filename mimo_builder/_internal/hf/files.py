"""A Hugging Face model folder on disk: ``config.json`` and safetensors weights (one file, or
shards listed by ``model.safetensors.index.json``). Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mimo_builder._internal.hf.mapping import HFWeightsError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def folder_problems(folder: str | Path) -> list[str]:
    """Why ``folder`` is not a Hugging Face model folder (empty when it is)."""
    path = Path(folder)
    if not path.is_dir():
        return [f"{str(folder)!r} is not a folder (nothing is downloaded: name a local folder, e.g. one "
                "written by save_pretrained or huggingface-cli download)"]
    if not (path / CONFIG).is_file():
        return [f"{str(folder)!r} has no {CONFIG}"]
    if not (path / WEIGHTS).is_file() and not (path / INDEX).is_file():
        return [f"{str(folder)!r} has neither {WEIGHTS} nor {INDEX} (only safetensors weights are read)"]
    return []


def read_config(folder: str | Path) -> dict:
    """The folder's config.json as a dict; an unreadable one is an HFWeightsError naming it."""
    data = _read_json(Path(folder) / CONFIG)
    if not isinstance(data, dict):
        raise HFWeightsError(f"{Path(folder) / CONFIG} holds a {type(data).__name__}, not a JSON object")
    return data


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFWeightsError(f"{path} cannot be read as JSON: {err}") from None


def _safetensors_header(file: Path, read):
    """``read(handle)`` on an open safetensors file; a truncated or corrupt one is an HFWeightsError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return read(handle)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise HFWeightsError(f"{file} cannot be read as safetensors ({type(err).__name__}: {err}); "
                             "is it complete?") from None


def _shard_of(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it."""
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX)
        if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
            raise HFWeightsError(f"{folder / INDEX} has no 'weight_map' object")
        return {name: folder / file for name, file in index["weight_map"].items()}
    return _safetensors_header(folder / WEIGHTS, lambda f: {name: folder / WEIGHTS for name in f.keys()})


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in _shard_of(Path(folder)).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        shapes.update(_safetensors_header(file, lambda f: {n: tuple(f.get_slice(n).get_shape()) for n in names}))
    return shapes


def read_tensors(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, on the CPU."""
    from safetensors import safe_open

    where = _shard_of(Path(folder))
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def write(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` as ``model.safetensors`` and ``config`` as config.json (each written to a
    temporary name, then renamed); returns the folder."""
    from safetensors.torch import save_file

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / f".{WEIGHTS}.partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path / WEIGHTS)
    partial = path / f".{CONFIG}.partial"
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path / CONFIG)
    return path
