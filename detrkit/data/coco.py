"""COCO-format detection datasets: locating, validating and loading them.

A dataset folder holds ``annotations.json`` and ``images/``, or ``train/`` and ``val/``
subfolders of that form. Annotation files are validated on load: every error names the
file and the offending entry, so a user can fix it without reading a traceback.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from detrkit.box_ops import box_area
from detrkit.data.image import read_image
from detrkit.data.transforms import Target, Transform
from detrkit.errors import DatasetError

ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"


def resolve_split(path: str | PathLike, split: str | None = None,
                  annotations_file: str | PathLike | None = None) -> tuple[Path, Path]:
    """Find a split's ``(images_dir, annotations_file)``.

    ``path`` is one of: a folder with ``<split>/annotations.json`` and ``<split>/images/``;
    a folder with ``annotations.json`` and ``images/`` directly (serves any split, and is the
    only form accepted when ``split`` is None); or, when ``annotations_file`` is given, the
    images folder itself.
    """
    path = Path(path)
    if annotations_file is not None:
        for p in (Path(annotations_file), path):
            if not p.exists():
                raise DatasetError(f"{p}: not found")
        return path, Path(annotations_file)
    candidates = [path / split] if split is not None else []
    for folder in candidates + [path]:
        if (folder / ANNOTATIONS_FILE).is_file() and (folder / IMAGES_DIR).is_dir():
            return folder / IMAGES_DIR, folder / ANNOTATIONS_FILE
    if split is None:
        raise DatasetError(f"{path}: no dataset; expected {ANNOTATIONS_FILE} and {IMAGES_DIR}/ in the folder")
    raise DatasetError(f"{path}: no dataset for split {split!r}; expected {split}/{ANNOTATIONS_FILE} and "
                       f"{split}/{IMAGES_DIR}/, or {ANNOTATIONS_FILE} and {IMAGES_DIR}/ in the folder")


class CategoryMap:
    """Dataset category ids (any sparse ints) <-> contiguous labels ``0..C-1`` in sorted-id order."""

    def __init__(self, ids: list[int], names: list[str]):
        if len(ids) != len(names):
            raise ValueError(f"category map: {len(ids)} ids but {len(names)} names")
        if len(set(ids)) != len(ids):
            raise ValueError(f"category map: duplicate ids in {ids}")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.ids = [int(ids[i]) for i in order]
        self.names = [str(names[i]) for i in order]
        self._label = {cat_id: label for label, cat_id in enumerate(self.ids)}

    @classmethod
    def from_coco(cls, categories: list[dict]) -> CategoryMap:
        return cls([c["id"] for c in categories], [c["name"] for c in categories])

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryMap) and (self.ids, self.names) == (other.ids, other.names)

    def __repr__(self) -> str:
        return f"CategoryMap({dict(zip(self.ids, self.names))})"

    def to_label(self, cat_id: int) -> int:
        return self._label[cat_id]

    def to_id(self, label: int) -> int:
        return self.ids[label]

    def to_dict(self) -> dict[str, list]:
        return {"ids": list(self.ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> CategoryMap:
        return cls(d["ids"], d["names"])


# ---------------------------------------------------------------- validation

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_bbox(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v)


def _entry(key: str, i: int, entry: Any) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"{key}[{i}] (id {entry['id']!r})"
    return f"{key}[{i}]"


_EXPECTED = {
    "id": "must be an integer",
    "image_id": "must be an integer",
    "category_id": "must be an integer",
    "file_name": "must be a string",
    "name": "must be a string",
    "bbox": "must be 4 finite numbers [x, y, width, height]",
}


def _check_entries(data: dict, key: str, required: dict[str, Callable[[Any], bool]], source: str) -> None:
    """Each entry of data[key] is a dict with the required fields, of the right kind, and a unique id."""
    seen: set[int] = set()
    for i, entry in enumerate(data[key]):
        where = f"{source}: {_entry(key, i, entry)}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {entry!r}")
        for field, ok in required.items():
            if field not in entry:
                raise DatasetError(f"{where}: missing key {field!r}")
            if not ok(entry[field]):
                raise DatasetError(f"{where}: {field} {_EXPECTED[field]}, got {entry[field]!r}")
        if entry["id"] in seen:
            raise DatasetError(f"{where}: duplicate id {entry['id']}")
        seen.add(entry["id"])


def load_annotations(annotations_file: str | PathLike, images_dir: str | PathLike) -> tuple[dict, dict]:
    """Read and validate a COCO annotation file.

    Returns ``(gt, stats)``: ``gt`` is the cleaned COCO dict (images, annotations,
    categories; every annotation has ``area`` and ``iscrowd``; boxes with non-positive
    width or height removed); ``stats`` is ``{"dropped": {reason: count}}``.
    Raises DatasetError naming the file and entry for malformed input or missing images.
    """
    source = str(annotations_file)
    try:
        with open(annotations_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{source}: annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{source}: cannot read annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{source}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{source}: {key!r} must be a list, got {type(data[key]).__name__}")

    _check_entries(data, "images", {"id": _is_int, "file_name": lambda v: isinstance(v, str)}, source)
    _check_entries(data, "categories", {"id": _is_int, "name": lambda v: isinstance(v, str)}, source)
    _check_entries(data, "annotations", {"id": _is_int, "image_id": _is_int, "category_id": _is_int,
                                         "bbox": _is_bbox}, source)

    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    annotations, dropped = [], 0
    for i, ann in enumerate(data["annotations"]):
        where = f"{source}: {_entry('annotations', i, ann)}"
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where}: image_id {ann['image_id']} is not in images")
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{where}: category_id {ann['category_id']} is not in categories")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" in ann and not _is_number(ann["area"]):
            raise DatasetError(f"{where}: area must be a finite number, got {ann['area']!r}")
        _, _, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            dropped += 1
            continue
        annotations.append({**ann, "area": ann.get("area", w * h), "iscrowd": ann.get("iscrowd", 0)})
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} boxes with non-positive width/height", stacklevel=2)

    missing = [(i, img) for i, img in enumerate(data["images"])
               if not (Path(images_dir) / img["file_name"]).is_file()]
    if missing:
        i, img = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{source}: {_entry('images', i, img)}: image file "
                           f"{Path(images_dir) / img['file_name']} not found{more}")

    gt = {"images": data["images"], "annotations": annotations, "categories": data["categories"]}
    return gt, {"dropped": {"non-positive width/height": dropped}}


def clip_boxes(annotations: list[dict], width: int, height: int) -> tuple[Tensor, Tensor]:
    """COCO boxes clipped to a ``width`` x ``height`` image.

    Returns ``boxes (n, 4)`` float32 xyxy absolute pixels and ``keep (n,)`` bool: False for
    boxes with no area left inside the image.
    """
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(0, width)
    boxes[:, 1::2].clamp_(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    ``dataset[i]`` is ``(image, target)``. Before ``transforms`` the image is an RGB PIL image
    and ``target`` holds ``boxes (n, 4)`` xyxy absolute pixels clipped to the image,
    ``labels (n,)`` int64 contiguous, ``area (n,)`` box area in pixels, ``image_id ()``,
    ``orig_size (2,)`` and ``size (2,)`` as ``(h, w)``; crowd boxes are left out.
    ``make_transforms`` ends with Normalize, after which the image is a ``(3, H, W)`` tensor
    and boxes are cxcywh normalised by ``size`` (the contract in docs/design.md).

    Attributes: ``categories`` (CategoryMap), ``gt`` (the cleaned COCO dict, crowd boxes
    included, for the evaluator), ``image_ids``, ``stats`` (see load_annotations).
    """

    def __init__(self, images_dir: str | PathLike, annotations_file: str | PathLike,
                 transforms: Transform | None = None):
        self.images_dir = Path(images_dir)
        self.gt, self.stats = load_annotations(annotations_file, images_dir)
        self.categories = CategoryMap.from_coco(self.gt["categories"])
        self.image_ids = [img["id"] for img in self.gt["images"]]
        self.transforms = transforms
        self._annotations: dict[int, list[dict]] = defaultdict(list)
        for ann in self.gt["annotations"]:
            if not ann["iscrowd"]:
                self._annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        info = self.gt["images"][index]
        image = read_image(self.images_dir / info["file_name"])
        w, h = image.size
        anns = self._annotations[info["id"]]
        boxes, keep = clip_boxes(anns, w, h)
        boxes = boxes[keep]
        labels = torch.tensor([self.categories.to_label(a["category_id"]) for a in anns], dtype=torch.int64)
        target = {
            "boxes": boxes,
            "labels": labels.reshape(-1)[keep],
            "area": box_area(boxes),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
