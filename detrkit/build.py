"""Build a model, its criterion and its post-processing from a :class:`~detrkit.config.Config`."""
from __future__ import annotations

from torch import nn

from detrkit.backbone import Backbone
from detrkit.config import Config
from detrkit.config import ConfigError
from detrkit.criterion import SetCriterion
from detrkit.deformable_detr import DeformableDETR
from detrkit.deformable_transformer import DeformableTransformer
from detrkit.detr import DETR
from detrkit.matcher import HungarianMatcher
from detrkit.position_encoding import build_position_encoding
from detrkit.recollection import MODES
from detrkit.postprocess import PostProcess, PostProcessTopK
from detrkit.transformer import Transformer

ARCHS = ("detr", "deformable_detr")


def uses_focal_loss(cfg: Config) -> bool:
    """Sigmoid focal classification (no "no object" class, top-k post-processing) or softmax."""
    return cfg.loss.class_loss == "focal"


def build_model(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {m.arch!r}; choose one of {', '.join(ARCHS)}")
    if m.recollection not in MODES:
        raise ConfigError(f"model.recollection: unknown mode {m.recollection!r}; choose one of {', '.join(MODES)}")
    num_class_outputs = m.num_classes if uses_focal_loss(cfg) else m.num_classes + 1
    d_model = m.transformer.d_model
    if m.arch == "detr":
        backbone = Backbone(m.backbone, return_layers=("layer4",))
        position_encoding = build_position_encoding(m.position_embedding, d_model)
        return DETR(backbone, position_encoding, Transformer(m.transformer, m.recollection, m.recurrent_steps),
                    num_class_outputs,
                    m.num_queries, aux_loss=m.aux_loss)
    if m.two_stage and not m.with_box_refine:
        raise ConfigError("model.two_stage needs model.with_box_refine (the encoder's proposals are "
                          "refined by the decoder's per-layer heads)")
    if d_model % 32:
        raise ConfigError(f"model.transformer.d_model: {d_model} must be a multiple of 32 (GroupNorm(32) projections)")
    # C3-C5 (strides 8, 16, 32); the levels beyond them are stride-2 convs on C5
    return_layers = ("layer2", "layer3", "layer4") if m.num_feature_levels > 1 else ("layer4",)
    backbone = Backbone(m.backbone, return_layers=return_layers[:m.num_feature_levels])
    # Deformable DETR's sine encoding measures positions from pixel centres
    position_encoding = build_position_encoding(m.position_embedding, d_model, offset=-0.5)
    return DeformableDETR(backbone, position_encoding, DeformableTransformer(m), num_class_outputs, m.num_queries,
                          m.num_feature_levels, aux_loss=m.aux_loss, with_box_refine=m.with_box_refine,
                          two_stage=m.two_stage)


def build_criterion(cfg: Config) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=cfg.matcher.cost_class, cost_bbox=cfg.matcher.cost_bbox,
                               cost_giou=cfg.matcher.cost_giou, focal=uses_focal_loss(cfg),
                               focal_alpha=cfg.loss.focal_alpha, focal_gamma=cfg.loss.focal_gamma)
    return SetCriterion(cfg.model.num_classes, matcher, cfg.loss)


def build_postprocess(cfg: Config) -> nn.Module:
    return PostProcessTopK() if uses_focal_loss(cfg) else PostProcess()
