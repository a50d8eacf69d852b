"""Synthetic shapes dataset: reproducible, valid COCO, varied and tightly boxed."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from detrkit.data.coco import CategoryMap, load_annotations, resolve_split
from detrkit.data.synth import SHAPES, draw_image, generate, shape_mask
from detrkit.errors import DetrkitError


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = _files(generate(tmp_path / "a", num_train=6, num_val=3, image_size=64, seed=3))
    b = _files(generate(tmp_path / "b", num_train=6, num_val=3, image_size=64, seed=3))
    c = _files(generate(tmp_path / "c", num_train=6, num_val=3, image_size=64, seed=4))
    assert len(a) == 2 + 9 and a == b  # two annotation files, nine images
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.suffix == ".png")


def test_an_image_does_not_depend_on_the_split_size(tmp_path):
    small = generate(tmp_path / "s", num_train=2, num_val=1, image_size=64)
    large = generate(tmp_path / "l", num_train=5, num_val=1, image_size=64)
    for name in ("000000.png", "000001.png"):
        assert (small / "train/images" / name).read_bytes() == (large / "train/images" / name).read_bytes()
    assert (small / "train/images/000000.png").read_bytes() != (small / "val/images/000000.png").read_bytes()


def test_valid_coco_with_sparse_ids(synth_root):
    for split, count in (("train", 24), ("val", 8)):
        images_dir, ann_file = resolve_split(synth_root, split)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no degenerate boxes either
            gt, _ = load_annotations(ann_file, images_dir)
        assert len(gt["images"]) == count
        cats = CategoryMap.from_coco(gt["categories"])
        assert cats.ids == [1, 3, 5, 7] and cats.names == list(SHAPES[:4])
        for img in gt["images"]:
            with Image.open(images_dir / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
                assert 72 <= im.width <= 96 and 72 <= im.height <= 96
        for a in gt["annotations"]:
            x, y, w, h = a["bbox"]
            img = next(i for i in gt["images"] if i["id"] == a["image_id"])
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0


def test_varied_content():
    rng_images = [draw_image(np.random.default_rng([0, 0, i]), 160, 6, 6, 0.1) for i in range(150)]
    objects = [o for _, objs in rng_images for o in objs]
    counts = [len(objs) for _, objs in rng_images]
    sizes = {(p.shape[1], p.shape[0]) for p, _ in rng_images}
    areas = np.array([w * h for _, (_, _, w, h) in objects])
    assert max(counts) <= 6 and 0 in counts and len(set(counts)) >= 5
    assert len(sizes) > 50 and all(120 <= s <= 160 for wh in sizes for s in wh)
    assert {cls for cls, _ in objects} == set(range(6))
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    assert areas.min() >= 4 * 4


# Area of each shape over its bounding box, from geometry. The star is 10 triangles between
# outer radius 1 and inner radius 0.45, 36° apart, in a 2cos(18°) x (1 + cos(36°)) box.
FILL = {
    "circle": math.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "cross": 5 / 9,
    "star": 5 * 0.45 * math.sin(math.radians(36)) / (2 * math.cos(math.radians(18)) * (1 + math.cos(math.radians(36)))),
    "ring": math.pi / 4 * (1 - 0.6**2),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks(shape):
    mask = shape_mask(shape, 200, 200)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight box
    assert abs(mask.mean() - FILL[shape]) < 0.03
    # Every shape is left-right symmetric: each row's margins agree, so no shape is cut off or shifted.
    rows = mask[mask.any(1)]
    left, right = rows.argmax(1), rows[:, ::-1].argmax(1)
    assert np.abs(left - right).max() <= 1
    small = shape_mask(shape, 30, 24)
    assert small.shape == (24, 30) and small[0].any() and small[-1].any() and small[:, 0].any() and small[:, -1].any()
    for other in SHAPES:
        if other != shape:
            o = shape_mask(other, 30, 24)
            assert (small & o).sum() / (small | o).sum() < 0.85, (shape, other)


def test_boxes_are_tight_on_the_shape():
    # For images holding one shape: every edge of its box touches the shape, and the ring of
    # pixels just outside the box is background (not the shape's colour).
    for i in range(30):
        pixels, objects = draw_image(np.random.default_rng([1, 0, i]), 160, 4, 1, 0.0)
        (_, (x, y, w, h)), = objects
        pixels = pixels.astype(float)
        ring = np.concatenate([pixels[max(y - 2, 0):y, x:x + w].reshape(-1, 3),
                               pixels[y + h:y + h + 2, x:x + w].reshape(-1, 3),
                               pixels[y:y + h, max(x - 2, 0):x].reshape(-1, 3),
                               pixels[y:y + h, x + w:x + w + 2].reshape(-1, 3)])
        inside = pixels[y:y + h, x:x + w]
        shape = np.linalg.norm(inside - np.median(ring, 0), axis=2) > 40
        assert shape[0].any() and shape[-1].any() and shape[:, 0].any() and shape[:, -1].any(), f"image {i}"
        colour = np.median(inside[shape], 0)
        assert (np.linalg.norm(ring - colour, axis=1) < 25).mean() < 0.1, f"image {i}"


def test_bad_arguments():
    with pytest.raises(DetrkitError, match="num_classes"):
        generate("/nonexistent", num_classes=9)


def test_annotation_file_is_plain_json(synth_root):
    data = json.loads((synth_root / "train/annotations.json").read_text())
    assert all(isinstance(v, int) for a in data["annotations"] for v in a["bbox"])
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
