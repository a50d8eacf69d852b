"""Box conversions, IoU and generalised IoU (Rezatofighi et al., 2019).

Boxes are ``(..., 4)`` tensors, either ``cxcywh`` (centre, width, height) or ``xyxy``
(top-left and bottom-right corners). Corners must satisfy ``x1 >= x0`` and ``y1 >= y0``;
this is not checked, because a check would force a device sync on every call, and inverted
boxes give meaningless (but finite) values.

Degenerate boxes (zero width or height) are allowed. A ratio whose denominator is zero (the
union of two zero-area boxes, or a zero-area enclosing box) is taken as 0, so IoU and GIoU
and their gradients stay finite: two zero-area boxes have IoU 0 and GIoU 0.
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """boxes: (..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """boxes: (..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """boxes: (..., 4) xyxy -> areas (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # A zero denominator only occurs with a zero numerator here; dividing by 1 there gives 0
    # and, unlike masking the quotient afterwards, keeps the backward pass free of 0/0.
    return num / torch.where(den != 0, den, torch.ones_like(den))


def _iou_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of broadcastable xyxy boxes a (..., 4), b (..., 4) -> two (...) tensors."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return _safe_div(inter, union), union


def _giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of broadcastable xyxy boxes a (..., 4), b (..., 4) -> (...)."""
    iou, union = _iou_union(a, b)
    wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(enclosing - union, enclosing)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU. boxes1: (N, 4), boxes2: (M, 4) xyxy -> (iou (N, M), union (N, M))."""
    return _iou_union(boxes1[:, None], boxes2[None])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU in [-1, 1]. boxes1: (N, 4), boxes2: (M, 4) xyxy -> (N, M)."""
    return _giou(boxes1[:, None], boxes2[None])


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corresponding rows. boxes1, boxes2: (N, 4) xyxy -> (N,).

    Equals ``generalized_box_iou(boxes1, boxes2).diagonal()`` without the (N, N) matrix.
    """
    return _giou(boxes1, boxes2)
