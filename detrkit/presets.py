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


def deformable_detr_r50() -> Config:
    """Deformable DETR, ResNet-50, 4 levels, 300 queries, focal loss, 50-epoch schedule."""
    cfg = Config()
    cfg.model.arch = "deformable_detr"
    cfg.model.num_queries = 300
    cfg.model.transformer.dim_feedforward = 1024
    cfg.loss.class_loss, cfg.loss.ce_coef, cfg.matcher.cost_class = "focal", 2.0, 2.0
    cfg.train.lr, cfg.train.lr_backbone = 2e-4, 2e-5
    cfg.train.epochs, cfg.train.lr_drop = 50, 40
    return cfg


def deformable_detr_r50_single_scale() -> Config:
    cfg = deformable_detr_r50()
    cfg.model.num_feature_levels = 1
    return cfg


def deformable_detr_r50_refine() -> Config:
    """+ iterative bounding box refinement."""
    cfg = deformable_detr_r50()
    cfg.model.with_box_refine = True
    return cfg


def deformable_detr_r50_two_stage() -> Config:
    """+ refinement + two-stage (encoder proposals as the decoder's reference boxes)."""
    cfg = deformable_detr_r50_refine()
    cfg.model.two_stage = True
    return cfg


def deformable_detr_small() -> Config:
    """A Deformable DETR that trains in minutes on a laptop CPU: ResNet-18, d_model 128, 3+3 layers."""
    cfg = deformable_detr_r50()
    small = detr_small()
    cfg.model.backbone, cfg.data, cfg.train = small.model.backbone, small.data, small.train
    cfg.model.num_queries = 50
    cfg.model.transformer = TransformerConfig(d_model=128, nheads=8, num_encoder_layers=3,
                                              num_decoder_layers=3, dim_feedforward=512, dropout=0.0)
    return cfg


def deformable_detr_small_refine() -> Config:
    cfg = deformable_detr_small()
    cfg.model.with_box_refine = True
    return cfg


def deformable_detr_small_two_stage() -> Config:
    cfg = deformable_detr_small_refine()
    cfg.model.two_stage = True
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {
    "detr_r50": detr_r50,
    "detr_r101": detr_r101,
    "detr_r50_dc5": detr_r50_dc5,
    "detr_r101_dc5": detr_r101_dc5,
    "detr_small": detr_small,
    "deformable_detr_r50": deformable_detr_r50,
    "deformable_detr_r50_single_scale": deformable_detr_r50_single_scale,
    "deformable_detr_r50_refine": deformable_detr_r50_refine,
    "deformable_detr_r50_two_stage": deformable_detr_r50_two_stage,
    "deformable_detr_small": deformable_detr_small,
    "deformable_detr_small_refine": deformable_detr_small_refine,
    "deformable_detr_small_two_stage": deformable_detr_small_two_stage,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
