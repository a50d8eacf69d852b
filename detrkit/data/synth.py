"""A procedurally drawn COCO-format dataset of shapes, for tests, demos and quick experiments.

Each image has a cluttered background (gradient, faint blobs, thin lines, pixel noise) and
0..max_objects solid shapes of distinct classes, small to large by COCO's area ranges, that
may overlap: a placement is rejected if it would hide more than half of an earlier shape, so
every annotated shape stays recognisable. Boxes are the extent of each shape's visible
pixels. Category ids are sparse (1, 3, 5, ...) so code that confuses ids and labels fails.
Every image is drawn from its own seed, so the output is byte-for-byte reproducible.
"""
from __future__ import annotations

import json
import math
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detrkit.errors import DetrkitError

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")

MIN_OBJECT = 8  # px, side of the smallest shapes
MAX_OBJECT_FRACTION = 0.65  # of image_size; above 96 px at 160 so COCO "large" shapes occur
SIZE_MIX = (0.25, 0.5, 0.25)  # chance of drawing a small (< 32²), medium or large (> 96²) shape
MIN_VISIBLE = 0.5  # fraction of each shape that later shapes must leave uncovered
MIN_CONTRAST = 60  # luminance difference between a shape and the background under it
MIN_COLOUR_DISTANCE = 100  # RGB distance between overlapping shapes
MAX_TRIES = 30


def _star_vertices() -> list[tuple[float, float]]:
    """A five-pointed star's outline (outer radius 1, inner 0.45), scaled to fill the unit square."""
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    radii = [1.0, 0.45] * 5
    xs = [r * math.cos(a) for r, a in zip(radii, angles)]
    ys = [r * math.sin(a) for r, a in zip(radii, angles)]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in zip(xs, ys)]


_STAR = _star_vertices()


def category_ids(num_classes: int) -> list[int]:
    return [2 * k + 1 for k in range(num_classes)]


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of ``shape`` touching all four sides of the box."""
    img = Image.new("L", (width, height))
    draw = ImageDraw.Draw(img)
    right, bottom = width - 1, height - 1
    if shape == "circle":
        draw.ellipse((0, 0, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, right, bottom), fill=255)
    elif shape == "triangle":
        draw.polygon([(0, bottom), (right, bottom), (right / 2, 0)], fill=255)
    elif shape == "cross":
        tw, th = max(2, round(width / 3)), max(2, round(height / 3))
        draw.rectangle(((width - tw) // 2, 0, (width - tw) // 2 + tw - 1, bottom), fill=255)
        draw.rectangle((0, (height - th) // 2, right, (height - th) // 2 + th - 1), fill=255)
    elif shape == "star":
        draw.polygon([(x * right, y * bottom) for x, y in _STAR], fill=255)
    elif shape == "ring":
        draw.ellipse((0, 0, right, bottom), outline=255, width=max(2, round(min(width, height) / 5)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 0


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) float: a linear colour gradient with faint blobs and thin lines on it."""
    c0 = rng.uniform(20, 235, 3)
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.ogrid[0:height, 0:width]
    t = (x * math.cos(angle) + y * math.sin(angle)).astype(np.float32)
    t = (t - t.min()) / max(t.max() - t.min(), 1)
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 5)):
        # Low-contrast irregular blobs: texture, not something to detect.
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 0.2 * max(width, height))
        k = rng.integers(6, 11)
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = r * rng.uniform(0.5, 1.0, k)
        base = np.array(img.getpixel((int(min(cx, width - 1)), int(min(cy, height - 1)))), dtype=float)
        colour = np.clip(base + rng.choice([-1, 1]) * rng.uniform(15, 35), 0, 255).astype(int)
        draw.polygon([(cx + a * math.cos(b), cy + a * math.sin(b)) for a, b in zip(radii, angles)],
                     fill=tuple(colour.tolist()))
    for _ in range(rng.integers(0, 6)):
        xy = rng.uniform(0, [width, height, width, height]).tolist()
        draw.line(xy, fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 3)))
    return np.asarray(img, dtype=np.float32)


def _pick_colour(rng: np.random.Generator, background_luminance: float,
                 overlapped: list[np.ndarray]) -> np.ndarray | None:
    """A colour that stands out from the background and from the shapes it overlaps, or None."""
    for _ in range(MAX_TRIES):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if (abs(_luminance(colour) - background_luminance) >= MIN_CONTRAST
                and all(np.linalg.norm(colour - c) >= MIN_COLOUR_DISTANCE for c in overlapped)):
            return colour
    return None


def _object_side(rng: np.random.Generator, image_size: int) -> float:
    hi = MAX_OBJECT_FRACTION * image_size
    ranges = [(MIN_OBJECT, 32), (32, 96), (96, hi)]
    usable = [(p, (lo, min(up, hi))) for p, (lo, up) in zip(SIZE_MIX, ranges) if lo < min(up, hi)]
    probs = np.array([p for p, _ in usable])
    lo, up = usable[rng.choice(len(usable), p=probs / probs.sum())][1]
    return rng.uniform(lo, up)


def draw_image(rng: np.random.Generator, image_size: int, num_classes: int, max_objects: int,
               empty_fraction: float) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image: ``(pixels (h, w, 3) uint8, [(class index, [x, y, w, h] visible extent)])``."""
    width, height = (int(v) for v in rng.integers(round(0.75 * image_size), image_size + 1, 2))
    background = _background(rng, width, height)
    canvas = background.copy()
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the shape on top, per pixel
    placed: list[tuple[int, int, int, int, int]] = []  # class, x, y, w, h
    full_area, visible, colours = [], [], []
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        for _ in range(MAX_TRIES):
            cls = int(rng.integers(num_classes))
            side, aspect = _object_side(rng, image_size), math.exp(rng.uniform(-0.25, 0.25))
            w = int(np.clip(round(side * math.sqrt(aspect)), 4, width))
            h = int(np.clip(round(side / math.sqrt(aspect)), 4, height))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            mask = shape_mask(SHAPES[cls], w, h)
            under = owner[y:y + h, x:x + w][mask]
            hidden = np.bincount(under[under >= 0], minlength=len(placed))
            if np.any(np.array(visible) - hidden < MIN_VISIBLE * np.array(full_area)):
                continue
            colour = _pick_colour(rng, _luminance(background[y:y + h, x:x + w][mask].mean(0)),
                                  [colours[j] for j in np.nonzero(hidden)[0]])
            if colour is None:
                continue
            canvas[y:y + h, x:x + w][mask] = colour
            owner[y:y + h, x:x + w][mask] = len(placed)
            visible = [v - int(c) for v, c in zip(visible, hidden)] + [int(mask.sum())]
            full_area.append(int(mask.sum()))
            colours.append(colour)
            placed.append((cls, x, y, w, h))
            break
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 7)
    objects = []
    for k, (cls, x, y, w, h) in enumerate(placed):
        own = owner[y:y + h, x:x + w] == k
        rows, cols = np.nonzero(own.any(1))[0], np.nonzero(own.any(0))[0]
        objects.append((cls, [x + int(cols[0]), y + int(rows[0]),
                              int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _write_split(split_dir: Path, rngs: list[np.random.Generator], image_size: int, num_classes: int,
                 max_objects: int, empty_fraction: float) -> None:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, ids = [], [], category_ids(num_classes)
    for i, rng in enumerate(rngs):
        pixels, objects = draw_image(rng, image_size, num_classes, max_objects, empty_fraction)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(split_dir / "images" / file_name, compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for cls, bbox in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[cls],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    categories = [{"id": cat_id, "name": name, "supercategory": "shape"}
                  for cat_id, name in zip(ids, SHAPES)]
    with open(split_dir / "annotations.json", "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def generate(out_dir: str | PathLike, num_train: int = 500, num_val: int = 100, image_size: int = 160,
             num_classes: int = 4, seed: int = 0, max_objects: int = 6, empty_fraction: float = 0.05) -> Path:
    """Write ``out_dir/{train,val}/annotations.json`` and ``out_dir/{train,val}/images/*.png``.

    Images have sides in [0.75, 1] * image_size; class k is ``SHAPES[k]`` with category id
    2k + 1. The same arguments always give the same bytes. Returns ``out_dir``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise DetrkitError(f"synth: num_classes must be between 1 and {len(SHAPES)}, got {num_classes}")
    if image_size < 4 * MIN_OBJECT:
        raise DetrkitError(f"synth: image_size must be at least {4 * MIN_OBJECT}, got {image_size}")
    if max_objects < 1:
        raise DetrkitError(f"synth: max_objects must be at least 1, got {max_objects}")
    out_dir = Path(out_dir)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        # One generator per image, seeded by (seed, split, index): an image does not depend on
        # how many others are drawn, and train and val never share one.
        rngs = [np.random.default_rng([seed, split_index, i]) for i in range(count)]
        _write_split(out_dir / split, rngs, image_size, num_classes, max_objects, empty_fraction)
    return out_dir
