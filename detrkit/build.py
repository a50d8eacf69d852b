"""Build a model, its criterion and its post-processing from a :class:`~detrkit.config.Config`."""
from __future__ import annotations

from torch import nn

from detrkit.backbone import Backbone
from detrkit.config import Config
from detrkit.criterion import SetCriterion
from detrkit.detr import DETR
from detrkit.matcher import HungarianMatcher
from detrkit.position_encoding import build_position_encoding
from detrkit.postprocess import PostProcess, PostProcessTopK
from detrkit.transformer import Transformer

ARCHS = ("detr",)


def uses_focal_loss(cfg: Config) -> bool:
    """Sigmoid focal classification (no "no object" class, top-k post-processing) or softmax."""
    return cfg.loss.class_loss == "focal"


def build_model(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {m.arch!r}; choose one of {', '.join(ARCHS)}")
    num_class_outputs = m.num_classes if uses_focal_loss(cfg) else m.num_classes + 1
    backbone = Backbone(m.backbone, return_layers=("layer4",))
    position_encoding = build_position_encoding(m.position_embedding, m.transformer.d_model)
    return DETR(backbone, position_encoding, Transformer(m.transformer), num_class_outputs,
                m.num_queries, aux_loss=m.aux_loss)


def build_criterion(cfg: Config) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=cfg.matcher.cost_class, cost_bbox=cfg.matcher.cost_bbox,
                               cost_giou=cfg.matcher.cost_giou, focal=uses_focal_loss(cfg),
                               focal_alpha=cfg.loss.focal_alpha, focal_gamma=cfg.loss.focal_gamma)
    return SetCriterion(cfg.model.num_classes, matcher, cfg.loss)


def build_postprocess(cfg: Config) -> nn.Module:
    return PostProcessTopK() if uses_focal_loss(cfg) else PostProcess()
