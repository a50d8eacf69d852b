"""Configuration: plain dataclasses, YAML files and ``key=value`` overrides.

A run is described by one :class:`Config`. Presets (``detrkit.presets``) are functions returning
a ``Config``; YAML files and ``--set section.field=value`` overrides are applied on top of a preset and
are checked against the dataclass fields, so a typo is an error, not a silently ignored key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detrkit.errors import DetrkitError


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    dilation: bool = False  # DC5: replace the last stage's stride by dilation
    weights: str | None = None  # torchvision-layout ImageNet state dict to start from
    norm: str = "frozen_bn"  # frozen_bn (pretrained statistics) | bn (training from scratch)
    frozen: list[str] = field(default_factory=lambda: ["stem", "layer1"])  # parts never trained
    train: bool = True  # False freezes the whole backbone (lr_backbone is then unused)


@dataclass
class TransformerConfig:
    d_model: int = 256
    nheads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1


@dataclass
class ModelConfig:
    arch: str = "detr"  # detr | deformable_detr
    num_classes: int = 91  # replaced by the dataset's category count when training
    num_queries: int = 100
    position_embedding: str = "sine"  # sine | learned
    aux_loss: bool = True
    recollection: str = "none"  # query recollection in training: none | sqr | dqr | recurrent (detrkit.recollection)
    recurrent_steps: int = 0  # > 0: a single-stage recurrent model, its decoder layer run this many times
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    # Deformable DETR only
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False


@dataclass
class MatcherConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass
class LossConfig:
    class_loss: str = "ce"  # ce (DETR, softmax with no-object class) | focal (Deformable DETR)
    ce_coef: float = 1.0  # weight of the class loss (2.0 for focal in Deformable DETR)
    bbox_coef: float = 5.0
    giou_coef: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class in the cross-entropy
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class DataConfig:
    train_scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    val_scale: int = 800
    max_size: int = 1333
    hflip: bool = True
    random_crop: bool = True  # DETR's random resize + crop, applied with probability 0.5
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])  # min, max side of the crop
    num_workers: int = 2


@dataclass
class TrainConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 0.1  # Deformable DETR: sampling offsets and reference points learn slower
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 300
    lr_drop: int = 200  # epoch at which the learning rate is multiplied by 0.1
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    amp: bool = False  # mixed precision where the hardware supports it
    seed: int = 42
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    time_limit: float = 0.0  # seconds; 0 means no limit. The run stops cleanly after the step that passes it.
    ema_decay: float = 0.0  # > 0: evaluate and save a moving average of the weights (detrkit.ema); e.g. 0.9998


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(DetrkitError):
    """A configuration file or override does not fit the dataclasses."""


# ---------------------------------------------------------------- dict / YAML / overrides

def _set_field(obj: Any, key: str, value: Any, where: str, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = f"{path}{key}"
    if key not in fields:
        raise ConfigError(f"{where}: unknown field {name!r}; known in this section: {', '.join(fields)}")
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name!r} is a section and needs a mapping, got {value!r}")
        update(current, value, where, f"{name}.")
    else:
        setattr(obj, key, _coerce(value, current, f"{where}: {name}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Convert ``value`` to the type of the field's current value (strings come from the CLI)."""
    if isinstance(value, str) and not isinstance(current, str):
        value = yaml.safe_load(value)
        if isinstance(value, str) and isinstance(current, float):
            try:  # YAML 1.1 reads "5e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return type(current)(value)
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def update(obj: Any, values: dict[str, Any], where: str = "config", path: str = "") -> Any:
    """Apply a nested mapping onto a config dataclass in place; unknown keys are errors.
    ``where`` names the source (a file, ``--set``) and ``path`` the section, in messages."""
    for key, value in values.items():
        _set_field(obj, key, value, where, path)
    return obj


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_dict(values: dict[str, Any]) -> Config:
    return update(Config(), values)


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config. A top-level ``preset: NAME`` key starts from that preset."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: cannot read config: {where}{getattr(e, 'problem', None) or e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    cfg = base or Config()
    if "preset" in values:
        from detrkit.presets import preset
        cfg = preset(values.pop("preset"))
    return update(cfg, values, str(path))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings, e.g. ``train.lr=2e-4`` or ``data.train_scales=[256,288]``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        *path, last = key.strip().split(".")
        node: dict[str, Any] = {}
        tip = node
        for part in path:
            tip[part] = {}
            tip = tip[part]
        tip[last] = value
        update(cfg, node, "--set")
    return cfg
