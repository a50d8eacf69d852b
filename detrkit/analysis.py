"""What each decoder stage predicts: per-stage COCO AP, and the SQR paper's two rates.

At inference a DETR-family decoder of S stages predicts a full set of detections after every
stage: stage i's are ``aux_outputs[i-1]``, the last stage's the main output. Query q of stage i
and query q of stage j are the same object query one refinement apart, so a query's predictions
can be followed through the decoder.

Chen et al. ("Enhanced Training of Query-Based Object Detection via Selective Query Recollection",
CVPR 2023, section 3) observed that the last stage is not always the best: a query can be right
at an early stage and lose it later. They count this with two rates, computed here by
:func:`fading_rates` under the following protocol, per image:

1. **Predictions.** A query's prediction at stage s is its best real class c_s (argmax of the
   class probabilities: sigmoid for focal models, softmax without "no object" otherwise), that
   class's probability as its score p_s, and its box b_s.
2. **TP / FP at the last stage S.** The last stage's predictions scored ``>= threshold`` (default
   0.3) are matched to the ground truth COCO-style: in descending score order, each takes the
   not yet matched ground-truth box of its class with the highest IoU, if that IoU is ``>=
   iou_threshold`` (0.5). Matched predictions are true positives (TP), the others false
   positives (FP). Crowd boxes are not ground truth here (an FP on one is counted).
3. **TP F Rate** (true positive fading rate): among the last stage's TPs, the fraction whose query
   had, at some earlier stage s < S, a prediction of the same class c_s = c_S with a higher IoU
   with the same ground-truth box *and* a higher score: IoU(b_s, g) > IoU(b_S, g) and p_s > p_S.
4. **FP E Rate** (false positive exacerbation rate): among the last stage's FPs, the fraction whose
   query had, at some earlier stage s < S, a lower score for the class it predicts at the last
   stage: P_s(c_S) < p_S (the decoder made the mistake more confident).

Both rates are counted over all images of a dataset (:class:`FadingCounts`). A stage-wise AP
(:func:`evaluate_stages`) uses the training evaluator, one forward pass per batch for all stages.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from detrkit.box_ops import box_cxcywh_to_xyxy, box_iou
from detrkit.data.coco import CategoryMap
from detrkit.engine import evaluate_each, model_outputs
from detrkit.evaluation import STAT_NAMES
from detrkit.errors import DetrkitError

# ---------------------------------------------------------------- decoder stages


def num_stages(model: nn.Module) -> int:
    """How many decoder stages ``model`` (DETR or Deformable DETR) runs at inference."""
    decoder = model.transformer.decoder
    return getattr(decoder, "recurrent_steps", 0) or len(decoder.layers)


@contextlib.contextmanager
def all_stages(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context ``model`` returns every stage's predictions (``aux_outputs``) even if it
    was built without auxiliary losses; the main output is unchanged."""
    before = model.aux_loss
    model.aux_loss = True
    try:
        yield model
    finally:
        model.aux_loss = before


def stage_predictions(outputs: dict) -> list[dict[str, Tensor]]:
    """A model's outputs (run in eval mode, see :func:`all_stages`) -> one dict per decoder stage,
    first to last, of ``pred_logits (B, N, C[+1])`` and ``pred_boxes (B, N, 4)``."""
    stages = [*outputs.get("aux_outputs", []), outputs]
    return [{"pred_logits": s["pred_logits"], "pred_boxes": s["pred_boxes"]} for s in stages]


def _checked(stages: list[dict], count: int) -> list[dict]:
    if len(stages) != count:
        raise DetrkitError(f"the model returned {len(stages)} sets of predictions for its {count} decoder "
                           "stages (is it in training mode, with query recollection?)")
    return stages


def evaluate_stages(model: nn.Module, postprocess: nn.Module, dataset: Dataset, categories: CategoryMap,
                    device: torch.device, batch_size: int = 2, amp: bool = False) -> list[dict[str, float]]:
    """COCO metrics of every decoder stage's predictions, first to last (the last is what
    :func:`detrkit.engine.evaluate` reports), from one forward pass per batch."""
    count = num_stages(model)
    with all_stages(model):
        return evaluate_each(model, postprocess, dataset, categories, device, batch_size, amp,
                             select=lambda outputs: _checked(stage_predictions(outputs), count), count=count)


def format_stage_table(stats: list[dict[str, float]]) -> str:
    """One row per stage, one column per COCO number (see :data:`detrkit.evaluation.STAT_NAMES`)."""
    lines = ["stage " + " ".join(f"{name:>6}" for name in STAT_NAMES)]
    for i, s in enumerate(stats, 1):
        lines.append(f"{i:>5} " + " ".join(f"{s[name]:6.3f}" for name in STAT_NAMES))
    return "\n".join(lines)


# ---------------------------------------------------------------- TP fading and FP exacerbation


def class_probabilities(logits: Tensor, focal: bool) -> Tensor:
    """logits (..., C) of a focal model or (..., C+1) of a softmax one -> (..., C) real-class probabilities."""
    logits = logits.float()
    return logits.sigmoid() if focal else logits.softmax(-1)[..., :-1]


def greedy_match(scores: Tensor, labels: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                 iou_threshold: float = 0.5) -> Tensor:
    """COCO-style matching: predictions in descending score order each take the unmatched
    ground-truth box of their class with the highest IoU, if it is at least ``iou_threshold``.

    scores, labels: (n,); boxes: (n, 4) xyxy; gt_boxes: (g, 4) xyxy in the same frame; gt_labels: (g,).
    Returns (n,) int64: each prediction's ground-truth index, -1 where unmatched."""
    matched = torch.full((len(scores),), -1, dtype=torch.int64)
    if len(scores) == 0 or len(gt_boxes) == 0:
        return matched
    iou = box_iou(boxes.float(), gt_boxes.float())[0]
    iou = iou.masked_fill(labels[:, None] != gt_labels[None, :], -1.0)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        candidates = iou[i].masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            matched[i] = best
            taken[best] = True
    return matched


@dataclass
class FadingCounts:
    """Counts behind the two rates (see the module docstring), summable over images."""
    true_positives: int = 0
    faded: int = 0  # TPs whose query had a better prediction (IoU and score) at an earlier stage
    false_positives: int = 0
    exacerbated: int = 0  # FPs whose query scored lower at an earlier stage

    def __add__(self, other: "FadingCounts") -> "FadingCounts":
        return FadingCounts(self.true_positives + other.true_positives, self.faded + other.faded,
                            self.false_positives + other.false_positives, self.exacerbated + other.exacerbated)

    @property
    def tp_fading_rate(self) -> float:
        """faded / true_positives (nan without true positives)."""
        return self.faded / self.true_positives if self.true_positives else math.nan

    @property
    def fp_exacerbation_rate(self) -> float:
        """exacerbated / false_positives (nan without false positives)."""
        return self.exacerbated / self.false_positives if self.false_positives else math.nan

    def to_dict(self) -> dict:
        """The counts and the rates (None where undefined), for JSON."""
        rates = {"tp_fading_rate": self.tp_fading_rate, "fp_exacerbation_rate": self.fp_exacerbation_rate}
        return {"true_positives": self.true_positives, "faded": self.faded,
                "false_positives": self.false_positives, "exacerbated": self.exacerbated,
                **{k: None if math.isnan(v) else v for k, v in rates.items()}}


def image_fading(probs: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, threshold: float = 0.3,
                 iou_threshold: float = 0.5) -> FadingCounts:
    """The counts of one image.

    probs: (S, N, C) real-class probabilities of N queries at S stages, the last stage last;
    boxes: (S, N, 4) xyxy; gt_boxes: (G, 4) xyxy in the same frame; gt_labels: (G,)."""
    probs, boxes = probs.float().cpu(), boxes.float().cpu()
    gt_boxes, gt_labels = gt_boxes.float().cpu(), gt_labels.cpu()
    scores, labels = probs.max(-1)  # (S, N)
    queries = (scores[-1] >= threshold).nonzero().flatten()
    matched = greedy_match(scores[-1, queries], labels[-1, queries], boxes[-1, queries], gt_boxes, gt_labels,
                           iou_threshold)
    counts = FadingCounts()
    for q, g in zip(queries.tolist(), matched.tolist()):
        label, score = labels[-1, q], scores[-1, q]
        if g >= 0:
            iou = box_iou(boxes[:, q], gt_boxes[g:g + 1])[0][:, 0]  # (S,)
            better = (labels[:-1, q] == label) & (iou[:-1] > iou[-1]) & (scores[:-1, q] > score)
            counts.true_positives += 1
            counts.faded += int(better.any())
        else:
            counts.false_positives += 1
            counts.exacerbated += int((probs[:-1, q, label] < score).any())
    return counts


@torch.no_grad()
def fading_rates(model: nn.Module, dataset: Dataset, device: torch.device, focal: bool, threshold: float = 0.3,
                 iou_threshold: float = 0.5, batch_size: int = 2, amp: bool = False) -> FadingCounts:
    """TP fading and FP exacerbation of ``model``'s last stage over ``dataset`` (prepared by the
    evaluation transforms; see the module docstring). ``focal``: sigmoid class scores (Deformable
    DETR) rather than softmax (DETR). Boxes are compared in the targets' normalised frame, where
    IoU equals IoU in pixels."""
    counts = FadingCounts()
    count = num_stages(model)
    with all_stages(model):
        for outputs, targets in model_outputs(model, dataset, device, batch_size, amp):
            stages = _checked(stage_predictions(outputs), count)
            probs = torch.stack([class_probabilities(s["pred_logits"], focal) for s in stages], 1)  # (B, S, N, C)
            boxes = box_cxcywh_to_xyxy(torch.stack([s["pred_boxes"].float() for s in stages], 1))
            for p, b, t in zip(probs, boxes, targets):
                counts += image_fading(p, b, box_cxcywh_to_xyxy(t["boxes"].float()), t["labels"], threshold,
                                       iou_threshold)
    return counts


def format_fading(counts: FadingCounts) -> str:
    def rate(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
    return (f"TP F Rate {rate(counts.tp_fading_rate):>6}  ({counts.faded} of {counts.true_positives} true "
            "positives had a better prediction at an earlier stage)\n"
            f"FP E Rate {rate(counts.fp_exacerbation_rate):>6}  ({counts.exacerbated} of {counts.false_positives} "
            "false positives scored lower at an earlier stage)")
