"""Reading foreign weight files safely: tensors and plain data only, never code.

``.pth`` / ``.bin`` files go through ``torch.load(weights_only=True)``, whose unpickler only builds
tensors and Python containers; the official training checkpoints also pickle their command line as
an ``argparse.Namespace``, the one extra class allowed here (a plain attribute bag). ``.safetensors``
files hold nothing but tensors. A truncated or corrupt file raises :class:`CheckpointError`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrkit.errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_torch(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors, containers and ``argparse.Namespace``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean: not a readable weights file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(f"{path}: refused to unpickle it: it holds Python objects other than tensors "
                                  f"and plain data ({msg}); detrkit never runs code from a checkpoint") from None
        raise CheckpointError(f"{path}: cannot read it as a torch file (truncated or corrupt?): {msg}") from None


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ValueError
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {e}") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """A weights file -> (state dict, metadata). The official checkpoints are ``{"model": state_dict,
    "args": Namespace, ...}``; ``metadata`` then holds ``args`` as a dict. Plain state dicts load too."""
    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)
    meta: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            meta["args"] = vars(args)
        elif isinstance(args, dict):
            meta["args"] = args
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), or a dict with one under 'model'")
    return dict(obj), meta


def read_sharded(folder: Path, index_name: str) -> dict[str, Tensor]:
    """Weights split over several files, as listed by a ``*.index.json`` (HuggingFace sharding)."""
    index = read_json(folder / index_name)
    shards = sorted(set(index.get("weight_map", {}).values()))
    if not shards:
        raise CheckpointError(f"{folder / index_name}: no 'weight_map' naming the shards")
    state: dict[str, Tensor] = {}
    for shard in shards:
        file = folder / shard
        if file.resolve().parent != folder.resolve():
            raise CheckpointError(f"{folder / index_name}: shard {shard!r} lies outside the folder")
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else read_state_dict(file)[0])
    return state


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupt JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj
