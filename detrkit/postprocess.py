"""Model outputs -> per-image detections in original-image pixels -> COCO results."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.box_ops import box_cxcywh_to_xyxy


def _to_absolute_xyxy(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """(B, N, 4) cxcywh in [0, 1] -> (B, N, 4) xyxy pixels of images sized (B, 2) (h, w)."""
    if target_sizes.shape != (boxes.shape[0], 2):
        raise ValueError(f"target_sizes must be ({boxes.shape[0]}, 2) (h, w), got {tuple(target_sizes.shape)}")
    xyxy = box_cxcywh_to_xyxy(boxes.float())
    img_h, img_w = target_sizes.to(device=boxes.device, dtype=torch.float32).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return xyxy * scale[:, None, :]


class PostProcess(nn.Module):
    """Detections of a softmax model (DETR): one per query, its best real class.

    Boxes are scaled to `target_sizes`, the ORIGINAL image sizes, so that they can be
    scored against the dataset's annotations whatever resizing the transforms did.
    """

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: pred_logits (B, N, C+1), last class = no object; pred_boxes (B, N, 4).
        target_sizes: (B, 2) (h, w).
        Returns per image: scores (N,), labels (N,) int64, boxes (N, 4) xyxy pixels, float32.
        """
        prob = F.softmax(outputs["pred_logits"].float(), dim=-1)
        scores, labels = prob[..., :-1].max(dim=-1)
        boxes = _to_absolute_xyxy(outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


class PostProcessTopK(nn.Module):
    """Detections of a sigmoid/focal model (Deformable DETR): the k best (query, class) pairs.

    A query may appear several times with different classes, which is what the focal loss
    trained for: each class is an independent binary decision.
    """

    def __init__(self, k: int = 100):
        super().__init__()
        self.k = k

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: pred_logits (B, N, C); pred_boxes (B, N, 4). target_sizes: (B, 2) (h, w).
        Returns per image, best first: scores (k,), labels (k,) int64, boxes (k, 4) xyxy
        pixels, float32; k is capped at N * C.
        """
        logits = outputs["pred_logits"].float()
        batch, num_queries, num_classes = logits.shape
        k = min(self.k, num_queries * num_classes)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = index // num_classes
        labels = index % num_classes
        boxes = _to_absolute_xyxy(outputs["pred_boxes"], target_sizes)
        boxes = boxes.gather(1, query[..., None].expand(batch, k, 4))
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


def to_coco_results(
    detections: list[dict[str, Tensor]],
    image_ids: Sequence[int] | Tensor,
    label_to_id: Callable[[int], int] | Sequence[int],
) -> list[dict]:
    """COCO results list from PostProcess(TopK) detections.

    Args:
        detections: per image, scores (n,), labels (n,) contiguous, boxes (n, 4) xyxy pixels.
        image_ids: the dataset's id of each image.
        label_to_id: contiguous label -> dataset category id (e.g. CategoryMap.to_id), or the
            ids indexed by label.

    Returns:
        [{image_id, category_id, bbox [x, y, w, h], score}] as Python numbers, boxes
        rounded to 0.01 px and scores to 1e-5 to keep results files small.
    """
    image_ids = [int(i) for i in image_ids]
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(detections)} detections but {len(image_ids)} image ids")
    to_id = label_to_id if callable(label_to_id) else [int(i) for i in label_to_id].__getitem__
    results = []
    for image_id, det in zip(image_ids, detections):
        # float64 before rounding: float32 0.01-multiples print with 17 digits.
        boxes = det["boxes"].detach().to("cpu", torch.float64)
        x0, y0, x1, y1 = boxes.unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).round(decimals=2).tolist()
        scores = det["scores"].detach().to("cpu", torch.float64).round(decimals=5).tolist()
        ids = {label: int(to_id(label)) for label in set(det["labels"].tolist())}
        results += [
            {"image_id": image_id, "category_id": ids[label], "bbox": box, "score": score}
            for label, box, score in zip(det["labels"].tolist(), xywh, scores)
        ]
    return results
