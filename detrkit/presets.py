"""Named presets: functions returning a :class:`~detrkit.config.Config`.

The paper presets reproduce the published recipes; the ``*_small`` presets train in minutes on a
laptop CPU (the demo and the tests use them).
"""
from __future__ import annotations

from typing import Callable

from detrkit.config import Config, ConfigError, TransformerConfig


def detr_r50() -> Config:
    """The DETR paper's main model: ResNet-50, 6+6 layers, 100 queries, 500-epoch schedule."""
    cfg = Config()
    cfg.train.epochs, cfg.train.lr_drop = 500, 400
    return cfg


def detr_r101() -> Config:
    cfg = detr_r50()
    cfg.model.backbone.name = "resnet101"
    return cfg


def detr_r50_dc5() -> Config:
    cfg = detr_r50()
    cfg.model.backbone.dilation = True
    return cfg


def detr_r101_dc5() -> Config:
    cfg = detr_r101()
    cfg.model.backbone.dilation = True
    return cfg


def _small_data(cfg: Config) -> None:
    cfg.data.train_scales = [224, 240, 256, 272, 288]
    cfg.data.val_scale = 256
    cfg.data.max_size = 384
    cfg.data.crop_scales = [160, 200, 240]
    cfg.data.crop_size = [128, 240]


def detr_small() -> Config:
    """A DETR that trains in minutes on a laptop CPU: ResNet-18, d_model 128, 3+3 layers."""
    cfg = Config()
    cfg.model.backbone.name = "resnet18"
    # no pretrained weights here: batch statistics are learned, and nothing is kept frozen
    cfg.model.backbone.norm, cfg.model.backbone.frozen = "bn", []
    cfg.model.num_queries = 30
    cfg.model.transformer = TransformerConfig(d_model=128, nheads=8, num_encoder_layers=3,
                                              num_decoder_layers=3, dim_feedforward=512, dropout=0.0)
    _small_data(cfg)
    cfg.train.batch_size = 8
    cfg.train.lr, cfg.train.lr_backbone = 2e-4, 2e-4
    cfg.train.epochs, cfg.train.lr_drop = 60, 45
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {
    "detr_r50": detr_r50,
    "detr_r101": detr_r101,
    "detr_r50_dc5": detr_r50_dc5,
    "detr_r101_dc5": detr_r101_dc5,
    "detr_small": detr_small,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
