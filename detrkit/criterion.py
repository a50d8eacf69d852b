"""Set prediction loss: Hungarian matching, then class, L1 and GIoU losses on the matched pairs.

Every output group is matched on its own: the main output, each ``aux_outputs`` entry (loss
names suffixed ``_0``, ``_1``, ...) and ``enc_outputs`` (suffix ``_enc``, matched against
class-agnostic targets as in two-stage Deformable DETR).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from detrkit.config import ConfigError, LossConfig
from detrkit.errors import TrainingError
from detrkit.matcher import HungarianMatcher


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al., 2017) on sigmoid probabilities.

    logits, targets: same shape, targets in {0, 1} -> loss of that shape (not reduced).
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


class SetCriterion(nn.Module):
    """DETR's loss: ``cfg.class_loss`` "ce" (softmax over C+1 with the no-object class weighted
    by ``eos_coef``) or "focal" (sigmoid focal over C, Deformable DETR), plus L1 and GIoU.

    Box losses and the focal loss are sums divided by the number of target boxes in the
    batch (averaged over processes when distributed); the cross-entropy is DETR's weighted mean.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cfg: LossConfig):
        super().__init__()
        if cfg.class_loss not in ("ce", "focal"):
            raise ConfigError(f"loss.class_loss: expected 'ce' or 'focal', got {cfg.class_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = cfg
        if cfg.class_loss == "ce":
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = cfg.eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    @property
    def weight_dict(self) -> dict[str, float]:
        """Coefficient of each loss term. Suffixed terms (``loss_giou_2``, ``loss_ce_enc``) take
        the coefficient of their base term; ``forward`` returns the weighted total as ``loss``."""
        return {"loss_ce": self.cfg.ce_coef, "loss_bbox": self.cfg.bbox_coef, "loss_giou": self.cfg.giou_coef}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: the model's dict (``pred_logits`` (B, N, C[+1]), ``pred_boxes`` (B, N, 4)
        cxcywh, optional ``aux_outputs`` list and ``enc_outputs``); targets: B dicts with
        ``labels`` (n_i,) and ``boxes`` (n_i, 4) cxcywh.

        Returns float32 scalars: ``loss_ce``, ``loss_bbox``, ``loss_giou`` and their suffixed
        versions (unweighted), ``loss`` (weighted total), and the logging statistics
        ``class_error`` and ``cardinality_error`` (main output only, no grad).
        """
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        groups = [("outputs", "", outputs, targets)]
        groups += [(f"aux_outputs[{i}]", f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            groups.append(("enc_outputs", "_enc", outputs["enc_outputs"], agnostic))

        weights = self.weight_dict
        losses: dict[str, Tensor] = {}
        total = torch.zeros((), device=num_boxes.device)
        num_logits = self.num_classes + (self.cfg.class_loss == "ce")
        for name, suffix, out, tgts in groups:
            # A focal model's logits fed to the CE loss (or the reverse) would otherwise train silently wrong.
            if out["pred_logits"].shape[-1] != num_logits:
                raise ValueError(f"{name}: pred_logits has {out['pred_logits'].shape[-1]} classes but "
                                 f"loss.class_loss={self.cfg.class_loss!r} with {self.num_classes} classes "
                                 f"expects {num_logits}")
            try:
                indices = self.matcher(out, tgts)
            except TrainingError as e:
                raise TrainingError(f"{name}: {e}") from None
            group = self._set_losses(out, tgts, indices, num_boxes)
            total = total + sum(weights[k] * v for k, v in group.items())
            losses.update({k + suffix: v for k, v in group.items()})
            if name == "outputs":
                stats = self._stats(out, tgts, indices)
        losses["loss"] = total
        losses.update(stats)
        return losses

    @staticmethod
    def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        # An all-empty batch still gets a defined class loss (everything is no-object).
        return num_boxes.clamp(min=1)

    def _set_losses(self, out: dict[str, Tensor], targets: list[dict[str, Tensor]],
                    indices: list[tuple[Tensor, Tensor]], num_boxes: Tensor) -> dict[str, Tensor]:
        logits = out["pred_logits"].float()
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])

        if self.cfg.class_loss == "ce":
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, src_idx] = labels
            # .to() is a no-op once the criterion has been moved; it spares callers that forget.
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))
        else:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, src_idx, labels] = 1
            loss_ce = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma).sum() / num_boxes

        src_boxes = out["pred_boxes"][batch_idx, src_idx].float()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @torch.no_grad()
    def _stats(self, out: dict[str, Tensor], targets: list[dict[str, Tensor]],
               indices: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """class_error: 100 - top-1 accuracy (%) on matched queries, 0 without targets.
        cardinality_error: mean over images of |#queries predicting an object - #targets|."""
        logits = out["pred_logits"].float()
        matched = torch.cat([logits[i, src] for i, (src, _) in enumerate(indices)])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        if labels.numel():
            class_error = 100 - 100 * (matched.argmax(-1) == labels).float().mean()
        else:
            class_error = torch.zeros((), device=logits.device)

        if self.cfg.class_loss == "ce":
            num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        else:
            num_pred = (logits.max(-1).values > 0).sum(1)  # sigmoid > 0.5
        num_tgt = torch.tensor([len(t["labels"]) for t in targets], device=logits.device)
        cardinality_error = (num_pred - num_tgt).abs().float().mean()
        return {"class_error": class_error, "cardinality_error": cardinality_error}


def nonfinite_terms(losses: dict[str, Tensor]) -> list[str]:
    """Names of the loss terms (all entries but the total ``loss``) that are NaN or inf.

    Syncs with the device once per term: call it only after the total was found non-finite.
    """
    return [k for k, v in losses.items() if k != "loss" and not torch.isfinite(v).all()]
