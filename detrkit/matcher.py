"""Hungarian matching between predictions and targets (DETR, Carion et al., 2020).

Each target is assigned to exactly one prediction so that the summed matching cost is
minimal; unassigned predictions are supervised as "no object" by the criterion.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detrkit.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detrkit.errors import TrainingError


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment under the cost

    ``cost_class * C_class + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy)``.

    ``C_class`` is ``-p(class)`` from a softmax (DETR) or, with ``focal=True``, the focal-loss
    difference of sigmoid probabilities used by Deformable DETR.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching cost weights are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits: (M, C) or (M, C+1) float32, labels: (T,) int64 -> (M, T)."""
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        p = logits.sigmoid()[:, labels]
        # Cost of calling the query positive minus the cost of leaving it negative; the 1e-8
        # keeps log finite for saturated probabilities.
        pos = self.focal_alpha * (1 - p) ** self.focal_gamma * -(p + 1e-8).log()
        neg = (1 - self.focal_alpha) * p ** self.focal_gamma * -(1 - p + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's predictions to its targets.

        outputs: ``pred_logits`` (B, N, C[+1]), ``pred_boxes`` (B, N, 4) cxcywh, any float dtype.
        targets: B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4) cxcywh.
        Returns B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length n_i: prediction
        ``pred_idx[k]`` is matched to target ``tgt_idx[k]``.
        Raises TrainingError when an image has more targets than queries or a cost is not finite.
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {batch} images")
        sizes = [len(t["boxes"]) for t in targets]
        for i, n in enumerate(sizes):
            if n > num_queries:
                raise TrainingError(f"image {i} of the batch has {n} target boxes but the model has only "
                                    f"{num_queries} queries; raise model.num_queries above {n}")

        # One cost matrix for the whole batch, in float32 whatever the model's dtype.
        logits = outputs["pred_logits"].flatten(0, 1).float()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        cost = (self.cost_class * self.class_cost(logits, labels)
                + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        cost = cost.view(batch, num_queries, -1).cpu()

        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            c = c[i]
            # scipy would only say "cost matrix is infeasible"; name the culprit instead.
            if not torch.isfinite(c).all():
                raise TrainingError(_nonfinite_message(outputs, targets, i))
            pred_idx, tgt_idx = linear_sum_assignment(c.numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices


def _nonfinite_message(outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], i: int) -> str:
    bad = [k for k in ("pred_logits", "pred_boxes") if not torch.isfinite(outputs[k][i]).all()]
    if not torch.isfinite(targets[i]["boxes"]).all():
        bad.append("target boxes")
    culprit = f"{' and '.join(bad)} contain NaN or inf" if bad else "inputs are finite, the cost overflowed"
    return f"matching cost is not finite for image {i} of the batch: {culprit}"
