"""COCO bbox evaluation on faster-coco-eval (same 12 numbers as pycocotools, much faster).

Ground truth is a COCO dict (images, annotations, categories); results are a COCO results
list of {image_id, category_id, bbox [x, y, w, h] absolute pixels, score}. Every image in the
ground truth is evaluated, so images a model found nothing in still count against recall.
A value of -1 means the number is undefined (e.g. APs when the ground truth has no small
objects), as in pycocotools.
"""

from __future__ import annotations

import json
from os import PathLike

import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster

from detrkit.errors import DetrkitError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (AP or AR, IoU, area, maxDets) of each entry of STAT_NAMES, for format_table.
_ROWS = (
    ("AP", "0.50:0.95", "all", 100),
    ("AP", "0.50", "all", 100),
    ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100),
    ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10),
    ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100),
    ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)


def _silent(*args) -> None:
    pass


def _index_gt(gt: dict, source: str) -> COCO:
    """Index a copy of `gt`: faster-coco-eval writes into the dicts it is given."""
    if not isinstance(gt, dict):
        raise DetrkitError(f"{source}: expected a COCO dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DetrkitError(f"{source}: missing or non-list '{key}'")
    images, annotations, categories = [], [], []
    field, i = "images", 0
    try:
        for i, im in enumerate(gt["images"]):
            images.append({"id": int(im["id"]), "height": im.get("height"), "width": im.get("width")})
        field = "categories"
        for i, cat in enumerate(gt["categories"]):
            categories.append({"id": int(cat["id"]), "name": str(cat.get("name", cat["id"]))})
        field = "annotations"
        for i, ann in enumerate(gt["annotations"]):
            x, y, w, h = (float(v) for v in ann["bbox"])
            annotations.append({
                # Fresh ids from 1: pycocotools' matcher reads id 0 as "unmatched".
                "id": i + 1,
                "image_id": int(ann["image_id"]),
                "category_id": int(ann["category_id"]),
                "bbox": [x, y, w, h],
                "area": float(ann.get("area", w * h)),
                "iscrowd": int(ann.get("iscrowd", 0)),
            })
    except KeyError as e:
        raise DetrkitError(f"{source}: {field}[{i}] has no {e}") from None
    except (TypeError, ValueError) as e:
        raise DetrkitError(f"{source}: {field}[{i}] is malformed ({e})") from None
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return COCO(dataset, print_function=_silent)


def _check_results(results: list[dict], coco_gt: COCO, source: str) -> list[dict]:
    """Validated, normalised copies of `results`."""
    if not isinstance(results, list):
        raise DetrkitError(f"{source}: expected a list of detections, got {type(results).__name__}")
    clean = []
    for i, r in enumerate(results):
        try:
            x, y, w, h = (float(v) for v in r["bbox"])
            det = {
                "image_id": int(r["image_id"]),
                "category_id": int(r["category_id"]),
                "bbox": [x, y, w, h],
                "score": float(r["score"]),
            }
        except KeyError as e:
            raise DetrkitError(f"{source}: results[{i}] has no {e}") from None
        except (TypeError, ValueError) as e:
            raise DetrkitError(
                f"{source}: results[{i}] is malformed ({e}); expected "
                "{image_id, category_id, bbox: [x, y, w, h], score}"
            ) from None
        if det["image_id"] not in coco_gt.imgs:
            raise DetrkitError(
                f"{source}: results[{i}] has image_id {det['image_id']}, which is not in the ground truth"
            )
        # pycocotools silently ignores unknown categories; here they are a label-mapping bug.
        if det["category_id"] not in coco_gt.cats:
            raise DetrkitError(
                f"{source}: results[{i}] has category_id {det['category_id']}, which is not in the ground truth"
            )
        clean.append(det)
    return clean


def _evaluate(coco_gt: COCO, results: list[dict], per_class: bool) -> dict[str, float]:
    # What COCO.loadRes builds for boxes, without its logging (it ignores print_function).
    dets = [{**d, "id": i + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0} for i, d in enumerate(results)]
    coco_dt = COCO({**coco_gt.dataset, "annotations": dets}, print_function=_silent)
    coco_eval = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_silent)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    if per_class:
        # precision: (iou thresholds, recall thresholds, categories, areas, maxDets)
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            stats[f"AP/{coco_gt.cats[cat_id]['name']}"] = float(p.mean()) if p.size else -1.0
    return stats


def evaluate(gt: dict, results: list[dict], per_class: bool = False) -> dict[str, float]:
    """COCO bbox metrics of `results` against `gt`.

    Args:
        gt: COCO ground truth dict; annotations need image_id, category_id, bbox and
            optionally area (default w * h) and iscrowd (default 0).
        results: COCO results list; every image_id and category_id must be in `gt`.
        per_class: also return "AP/<category name>" (AP@[.50:.95], area all, 100 dets).

    Returns:
        {name: value} for name in STAT_NAMES (+ per-class entries); -1 where undefined.
    """
    coco_gt = _index_gt(gt, "ground truth")
    return _evaluate(coco_gt, _check_results(results, coco_gt, "results"), per_class)


def _read_json(path: str | PathLike, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DetrkitError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetrkitError(f"{path}: {what} is not valid JSON ({e})") from None


def evaluate_files(
    results_json: str | PathLike, annotations_json: str | PathLike, per_class: bool = False
) -> dict[str, float]:
    """`evaluate` for a COCO results file against a COCO annotation file."""
    coco_gt = _index_gt(_read_json(annotations_json, "annotation file"), str(annotations_json))
    results = _read_json(results_json, "results file")
    return _evaluate(coco_gt, _check_results(results, coco_gt, str(results_json)), per_class)


class CocoEvaluator:
    """Collects results over an evaluation run, possibly split across processes.

    Results are kept per image: a later `update` for an image replaces its earlier results,
    so images seen twice (DistributedSampler pads the last batch with repeats) count once.
    """

    def __init__(self, gt: dict, per_class: bool = False):
        self.coco_gt = _index_gt(gt, "ground truth")
        self.per_class = per_class
        self._by_image: dict[int, list[dict]] = {}

    def update(self, results: list[dict]) -> None:
        grouped: dict[int, list[dict]] = {}
        for det in _check_results(results, self.coco_gt, "results"):
            grouped.setdefault(det["image_id"], []).append(det)
        self._by_image.update(grouped)

    @property
    def results(self) -> list[dict]:
        """This process's results."""
        return [det for dets in self._by_image.values() for det in dets]

    def gather(self) -> list[dict]:
        """All processes' results. Collective: every rank must call it."""
        by_image = self._by_image
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, by_image)
            by_image = {}
            for part in parts:
                by_image.update(part)
        return [det for dets in by_image.values() for det in dets]

    def summarize(self) -> dict[str, float]:
        """Metrics over all processes' results (see `evaluate`). Collective."""
        return _evaluate(self.coco_gt, self.gather(), self.per_class)


def format_table(stats: dict[str, float]) -> str:
    """The 12 numbers as pycocotools prints them, then per-class AP if present."""
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        where = f"IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d}"
        lines.append(f" {title:<18} ({kind}) @[ {where} ] = {stats[name]:0.3f}")
    per_class = {k[3:]: v for k, v in stats.items() if k.startswith("AP/")}
    if per_class:
        lines.append(" Per-category Average Precision (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
        width = max(len(n) for n in per_class)
        lines += [f"   {n:<{width}} = {v:0.3f}" for n, v in per_class.items()]
    return "\n".join(lines)
