"""Dataset checks: validate an annotation file, decode every image, and summarise what is there."""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from os import PathLike
from pathlib import Path
from typing import Any

from detrkit.data.coco import CategoryMap, clip_boxes, load_annotations
from detrkit.data.image import read_image
from detrkit.errors import DatasetError

# COCO's area ranges (pycocotools' areaRng): small < 32², medium up to 96², large above.
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def _size_class(area: float) -> str:
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


def check_dataset(images_dir: str | PathLike, annotations_file: str | PathLike) -> dict[str, Any]:
    """Validate a COCO dataset and count what it holds.

    Raises DatasetError for a malformed annotation file, missing images or images that
    cannot be decoded (naming them). Crowd boxes are counted apart; every other count is
    of the boxes training sees. The report is plain JSON-compatible data:
    ``images``, ``empty_images`` (no non-crowd boxes), ``boxes``, ``crowd``,
    ``classes`` [{label, id, name, boxes}], ``sizes`` {small, medium, large} (by
    annotation area), ``dropped`` {reason: count}, ``width``/``height`` [min, max] of the
    decoded images, ``size_mismatch`` (images whose declared width/height differ).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped boxes are in the report instead
        gt, stats = load_annotations(annotations_file, images_dir)
    categories = CategoryMap.from_coco(gt["categories"])

    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)

    per_class: Counter[int] = Counter()
    sizes: Counter[str] = Counter({"small": 0, "medium": 0, "large": 0})
    widths, heights, unreadable = [], [], []
    crowd = outside = empty = mismatch = 0
    for img in gt["images"]:
        try:
            w, h = read_image(Path(images_dir) / img["file_name"]).size
        except DatasetError as e:
            unreadable.append(str(e))
            continue
        widths.append(w)
        heights.append(h)
        mismatch += (img.get("width", w), img.get("height", h)) != (w, h)
        anns = [a for a in by_image[img["id"]] if not a["iscrowd"]]
        crowd += len(by_image[img["id"]]) - len(anns)
        _, keep = clip_boxes(anns, w, h)
        outside += int((~keep).sum())
        kept = [a for a, k in zip(anns, keep.tolist()) if k]
        empty += not kept
        per_class.update(a["category_id"] for a in kept)
        sizes.update(_size_class(a["area"]) for a in kept)
    if unreadable:
        more = f" (and {len(unreadable) - 1} more unreadable images)" if len(unreadable) > 1 else ""
        raise DatasetError(f"{unreadable[0]}{more}")

    return {
        "annotations_file": str(annotations_file),
        "images_dir": str(images_dir),
        "images": len(gt["images"]),
        "empty_images": empty,
        "boxes": sum(per_class.values()),
        "crowd": crowd,
        "classes": [{"label": label, "id": cat_id, "name": name, "boxes": per_class[cat_id]}
                    for label, (cat_id, name) in enumerate(zip(categories.ids, categories.names))],
        "sizes": dict(sizes),
        "dropped": {**stats["dropped"], "outside the image": outside},
        "width": [min(widths), max(widths)] if widths else None,
        "height": [min(heights), max(heights)] if heights else None,
        "size_mismatch": mismatch,
    }


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of a check_dataset report."""
    lines = [
        f"annotations: {report['annotations_file']}",
        f"images:      {report['images_dir']}",
        f"{report['images']} images ({report['empty_images']} without boxes), "
        f"{report['boxes']} boxes, {report['crowd']} crowd boxes (ignored in training)",
    ]
    if report["width"] is not None:
        lines.append(f"image size: width {report['width'][0]}..{report['width'][1]}, "
                     f"height {report['height'][0]}..{report['height'][1]}")
    if report["size_mismatch"]:
        lines.append(f"warning: {report['size_mismatch']} images differ in size from their declared width/height")
    s = report["sizes"]
    lines.append(f"box sizes: {s['small']} small (< 32²), {s['medium']} medium, {s['large']} large (> 96²)")
    for reason, count in report["dropped"].items():
        if count:
            lines.append(f"dropped {count} boxes: {reason}")
    lines.append(f"{len(report['classes'])} classes (label  id  name  boxes):")
    lines += [f"  {c['label']:>4}  {c['id']:>4}  {c['name']}  {c['boxes']}" for c in report["classes"]]
    return "\n".join(lines)
