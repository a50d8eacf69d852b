"""Deformable DETR (Zhu et al., 2021): multi-scale features, deformable attention, sigmoid classes.

Variants from the paper: single-scale (``num_feature_levels=1``), iterative bounding box
refinement (``with_box_refine``: each decoder layer has its own heads and refines the previous
layer's boxes) and two-stage (``two_stage``: the encoder proposes the decoder's reference boxes).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.backbone import Backbone
from detrkit.deformable_transformer import DeformableTransformer, refine_boxes
from detrkit.detr import MLP, set_outputs
from detrkit.ops.linear import Linear
from detrkit.recollection import layer_index


class DeformableDETR(nn.Module):
    def __init__(self, backbone: Backbone, position_encoding: nn.Module, transformer: DeformableTransformer,
                 num_classes: int, num_queries: int, num_feature_levels: int, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        d = transformer.d_model
        self.backbone, self.position_encoding, self.transformer = backbone, position_encoding, transformer
        self.num_feature_levels, self.aux_loss, self.two_stage = num_feature_levels, aux_loss, two_stage
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)  # query position and content
        # one projection per backbone level, then stride-2 3x3 convs for the extra levels
        projections = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in backbone.num_channels]
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - len(backbone.num_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_channels = d
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        # in the layout of the backbone's features (see Backbone), or every call copies the weights:
        # 5 ms for the stride-2 conv of ResNet-50's 2048 channels
        self.input_proj.to(memory_format=torch.channels_last)

        class_embed, bbox_embed = Linear(d, num_classes), MLP(d, d, 4, 3)
        prior = 0.01  # focal-loss prior: every class starts at probability 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)  # two-stage: + the encoder's
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            transformer.decoder.bbox_embed = self.bbox_embed
        else:  # the same heads for every layer
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        # The first layer predicts from a point: start it on small boxes (sigmoid(-2) = 0.12). Later
        # refining layers, and every layer of the two-stage model, start from a box and keep it.
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
        else:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The L projected feature maps (B, d, H_l, W_l) and their padding masks (B, H_l, W_l)."""
        levels = self.backbone(images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, levels)]
        masks = [m for _, m in levels]
        for proj in self.input_proj[len(levels):]:
            srcs.append(proj(levels[-1][0] if len(srcs) == len(levels) else srcs[-1]))
            masks.append(F.interpolate(mask[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0])
        return srcs, masks

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True = padding.

        Returns ``pred_logits`` (B, N, num_classes) (sigmoid scores), ``pred_boxes`` (B, N, 4) cxcywh
        in [0, 1], ``aux_outputs`` for the earlier decoder layers and, two-stage, ``enc_outputs``."""
        srcs, masks = self.features(images, mask)
        pos = [self.position_encoding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        enc = self.transformer.encode(srcs, masks, pos)
        tgt, query_pos, reference, enc_outputs = self.transformer.queries(
            enc, None if self.two_stage else self.query_embed.weight)
        hs, references, num_groups = self.transformer.decoder(
            tgt, reference, query_pos, enc["memory"], enc["spatial_shapes"], enc["level_start_index"],
            enc["ratios"], enc["padding_mask"])
        heads = [layer_index(i, self.transformer.decoder.num_layers) for i in range(len(hs))]
        logits = [self.class_embed[k](h) for k, h in zip(heads, hs)]
        boxes = [refine_boxes(self.bbox_embed[k](h), r) for k, h, r in zip(heads, hs, references)]
        out = set_outputs(logits, boxes, num_groups, self.aux_loss)
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        return out
