"""One entry point for every checkpoint detrkit reads, and the conversions between formats.

``load_model(path)`` accepts: a detrkit model folder, checkpoint folder or training run folder;
a HuggingFace ``save_pretrained`` folder of ``DetrForObjectDetection`` or
``DeformableDetrForObjectDetection``; an official DETR / Deformable DETR ``.pth`` (``{"model": ...}``
or a bare state dict), or a state dict file in detrkit's names (``.pth`` or ``.safetensors``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from detrkit import checkpoint
from detrkit.build import build_model
from detrkit.config import Config, from_dict
from detrkit.data.coco import CategoryMap
from detrkit.errors import CheckpointError
from detrkit.interop import hf, official
from detrkit.interop.coco_names import COCO_91
from detrkit.interop.files import read_state_dict
from detrkit.interop.infer import fill_shared_heads, infer_config

Loaded = tuple[nn.Module, Config, CategoryMap]
HINTS = ("nheads", "dilation", "num_queries")


def load_model(path: str | Path, **hints) -> Loaded:
    """Build the model a checkpoint describes and load its weights.

    ``hints`` supply what foreign weights do not show (see :mod:`detrkit.interop.infer`):
    ``dilation=True`` for a DC5 backbone (also assumed when the file name contains "dc5"),
    ``nheads``, and ``num_queries`` of a two-stage model. Native checkpoints ignore them.
    Raises CheckpointError naming the missing / unexpected keys when the weights do not fit."""
    unknown = set(hints) - set(HINTS)
    if unknown:
        raise TypeError(f"unknown hints {sorted(unknown)}; known: {', '.join(HINTS)}")
    path = Path(path)
    if path.is_dir():
        if hf.is_hf_folder(path):
            _, found, categories, state, unknown_keys = hf.read_folder(path)
            state.update({k: torch.empty(0) for k in unknown_keys})  # reported as unexpected keys
            return _build(state, _merge(found, hints), str(path), categories)
        return _load_native(path)
    if path.is_file():
        state, meta = read_state_dict(path)
        if official.is_official(state):
            state = official.official_to_detrkit(state, str(path))
        args = meta.get("args", {})
        found = {"nheads": args.get("nheads"), "dilation": args.get("dilation"), "num_queries": args.get("num_queries")}
        if found["dilation"] is None and "dc5" in path.name.lower():
            found["dilation"] = True
        return _build(state, _merge(found, hints), str(path), None)
    raise CheckpointError(f"{path}: no such file or folder")


def _merge(found: dict, hints: dict) -> dict:
    return {**found, **{k: v for k, v in hints.items() if v is not None}}


def _load_native(path: Path) -> Loaded:
    ckpt = checkpoint.latest_checkpoint(path)
    meta = checkpoint.read_config(ckpt)
    cfg = from_dict(meta["config"])
    cfg.model.backbone.weights = None  # the checkpoint holds the trained backbone; no ImageNet file needed
    model = build_model(cfg)
    checkpoint.load_state_dict_strict(model, checkpoint.read_tensors(ckpt / checkpoint.MODEL_FILE), str(ckpt))
    return model, cfg, CategoryMap.from_dict(meta["categories"])


def _build(state: dict[str, Tensor], hints: dict, source: str, categories: CategoryMap | None) -> Loaded:
    cfg = infer_config(state, hints, source)
    model = build_model(cfg)
    state = fill_shared_heads(state, list(model.state_dict()))
    expected = model.state_dict()
    state = {k: v for k, v in state.items()  # trainable BN counters are not weights
             if not (k.endswith("num_batches_tracked") and k not in expected)}
    checkpoint.load_state_dict_strict(model, state, source)
    n = cfg.model.num_classes
    if categories is None or len(categories) != n:
        categories = CategoryMap(list(range(n)), COCO_91 if n == 91 else [f"class_{i}" for i in range(n)])
    return model.eval(), cfg, categories


# ---------------------------------------------------------------- writing

def convert(src: str | Path, out: str | Path, **hints) -> Path:
    """Any loadable checkpoint -> detrkit's native folder (config.json + model.safetensors)."""
    model, cfg, categories = load_model(src, **hints)
    return checkpoint.save_model(out, model, cfg.to_dict(), categories.to_dict())


def export(src: str | Path, out: str | Path, fmt: str = "hf", **hints) -> Path:
    """Any loadable checkpoint -> ``fmt``: "hf" (a transformers ``save_pretrained`` folder) or
    "official" (a ``.pth`` holding ``{"model": state_dict}`` in the official implementation's names)."""
    model, cfg, categories = load_model(src, **hints)
    out = Path(out)
    if fmt == "hf":
        return hf.write_folder(out, model, cfg, categories)
    if fmt == "official":
        state = {k: v.detach().cpu().clone() for k, v in official.detrkit_to_official(model.state_dict()).items()
                 if not k.endswith("num_batches_tracked")}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        torch.save({"model": state}, tmp)
        os.replace(tmp, out)
        return out
    raise CheckpointError(f"unknown export format {fmt!r}; choose hf or official")
