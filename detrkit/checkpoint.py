"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder::

    config.json                  {"format": "detrkit", "config": {...}, "categories": {...}}
    model.safetensors            the model's state dict (a run with train.ema_decay: the average's)
    optimizer.safetensors        optional: the optimizer's tensors and the torch RNG state
    state.json                   optional: epoch, step, RNG states, optimizer structure
    live_model.safetensors       optional: the trained weights, when model.safetensors holds their average

The first two alone are detrkit's native model format (what ``detrkit.load`` reads). A training
run keeps ``RUN/checkpoints/step_00001234/`` folders and a ``RUN/checkpoints/latest`` file naming
the newest. Each folder is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically, so an interrupted write never leaves a half-written
checkpoint where a reader would find it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from detrkit.errors import CheckpointError

FORMAT = "detrkit"
CONFIG_FILE, MODEL_FILE = "config.json", "model.safetensors"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"
LIVE_MODEL_FILE = "live_model.safetensors"


def _tensors_for_saving(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); independent copies load the same.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(out_dir: str | Path, model: torch.nn.Module, config: dict, categories: dict,
               extra: dict[str, Any] | None = None) -> Path:
    """Write detrkit's native model format (config.json + model.safetensors) atomically.

    ``extra`` maps file names to either a dict of tensors (saved as safetensors) or a JSON-able
    object; training checkpoints use it for the optimizer and loop state."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        _write_json(tmp / CONFIG_FILE, {"format": FORMAT, "config": config, "categories": categories})
        save_file(_tensors_for_saving(model.state_dict()), str(tmp / MODEL_FILE))
        for name, obj in (extra or {}).items():
            if name.endswith(".safetensors"):
                save_file(_tensors_for_saving(obj), str(tmp / name))
            else:
                _write_json(tmp / name, obj)
        for f in tmp.iterdir():  # make the data durable before the rename publishes it
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(path: str | Path) -> dict:
    """Read ``config.json`` of a native model folder, with errors naming the file."""
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (is {path} a detrkit model folder?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable or corrupt JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{file}: not a detrkit config (expected keys 'format': '{FORMAT}', 'config')")
    return meta


def read_state(path: str | Path) -> dict:
    """Read ``state.json`` of a training checkpoint (loop state, RNG states, optimizer structure)."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found ({path} holds a model, not a training checkpoint "
                              "to resume)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable or corrupt JSON: {e}") from None
    missing = [k for k in ("epoch", "step_in_epoch", "global_step", "elapsed", "optimizer", "rng_python",
                           "rng_numpy") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a detrkit training state (missing {', '.join(missing)})")
    return state


def read_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file}: not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file: {e}") from None


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` whose error lists the missing / unexpected / mis-shaped keys and names the source."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]  # model order
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")
        parts = [f"{name} ({len(items)}): {show(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state_dict)


# ---------------------------------------------------------------- training runs

def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def publish_latest(run_dir: str | Path, ckpt: Path, keep: int = 2) -> None:
    """Point ``RUN/checkpoints/latest`` at ``ckpt`` and delete all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    _atomic_write_text(root / "latest", ckpt.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder, a ``checkpoints`` folder or a checkpoint folder to a checkpoint folder."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.exists():
            ckpt = root / pointer.read_text().strip()
            if not (ckpt / CONFIG_FILE).exists():
                raise CheckpointError(f"{pointer}: names {ckpt.name}, which is missing or incomplete")
            return ckpt
    raise CheckpointError(f"{path}: no detrkit checkpoint here (no {CONFIG_FILE} and no checkpoints/latest)")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able structure."""
    sd = optimizer.state_dict()
    tensors, structure = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        structure["state"][str(idx)] = {}
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
                structure["state"][str(idx)][name] = None
            else:
                structure["state"][str(idx)][name] = value
    return tensors, structure


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {int(idx): {name: tensors[f"{idx}.{name}"] if value is None else value
                        for name, value in entries.items()}
             for idx, entries in structure["state"].items()}
    return {"state": state, "param_groups": structure["param_groups"]}
