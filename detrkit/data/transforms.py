"""Joint image + target transforms, and DETR's training / evaluation recipes.

Until ``Normalize`` every transform takes and returns ``(PIL image, target)`` with
``target["boxes"] (n, 4)`` xyxy in absolute pixels, ``area (n,)`` their areas in pixels and
``size (2,)`` = ``(h, w)`` of the current image. ``Normalize`` turns the boxes into cxcywh
normalised by the image size (the contract in docs/design.md). The target may be None
(inference): only the image is transformed. Randomness comes from torch's global
generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detrkit.box_ops import box_area, box_xyxy_to_cxcywh
from detrkit.config import DataConfig

Target = dict[str, Tensor]
Transform = Callable[[Any, Target | None], tuple[Any, Target | None]]

# Fields with one entry per box; cropping filters them together.
PER_BOX = ("boxes", "labels", "area")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rand() -> float:
    return torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive."""
    return int(torch.randint(low, high + 1, ()).item())


def _size(image: Image.Image) -> Tensor:
    return torch.tensor([image.height, image.width], dtype=torch.int64)


def hflip(image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if target is None:
        return flipped, None
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    boxes = torch.stack([image.width - x1, y0, image.width - x0, y1], dim=-1)
    return flipped, {**target, "boxes": boxes}


def resized_shape(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``size``, the longer one to at most ``max_size``."""
    scale = size / min(width, height)
    if max_size is not None and max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image, target: Target | None, size: int,
           max_size: int | None = None) -> tuple[Image.Image, Target | None]:
    new_w, new_h = resized_shape(image.width, image.height, size, max_size)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if target is None:
        return resized, None
    sx, sy = new_w / image.width, new_h / image.height
    boxes = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    return resized, {**target, "boxes": boxes, "area": box_area(boxes), "size": _size(resized)}


def crop(image: Image.Image, target: Target | None, top: int, left: int, height: int,
         width: int) -> tuple[Image.Image, Target | None]:
    """Crop to the region; boxes are clipped to it and those left with no area are dropped."""
    cropped = image.crop((left, top, left + width, top + height))
    if target is None:
        return cropped, None
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2].clamp_(0, width)
    boxes[:, 1::2].clamp_(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = {**target, "boxes": boxes, "area": box_area(boxes), "size": _size(cropped)}
    for key in PER_BOX:
        if key in target:
            target[key] = target[key][keep]
    return cropped, target


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        return hflip(image, target) if _rand() < self.p else (image, target)


class RandomResize:
    """Shorter side to a size drawn from ``sizes``, longer side capped at ``max_size``, aspect kept."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        return resize(image, target, self.sizes[_randint(0, len(self.sizes) - 1)], self.max_size)


class RandomSizeCrop:
    """Crop a region of random width and height in [min_size, max_size] (at most the image) at a random place."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        w_hi, h_hi = min(image.width, self.max_size), min(image.height, self.max_size)
        w = _randint(min(self.min_size, w_hi), w_hi)
        h = _randint(min(self.min_size, h_hi), h_hi)
        return crop(image, target, _randint(0, image.height - h), _randint(0, image.width - w), h, w)


class RandomSelect:
    """Apply ``a`` with probability ``p``, else ``b``."""

    def __init__(self, a: Transform, b: Transform, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        return self.a(image, target) if _rand() < self.p else self.b(image, target)


class ToTensor:
    """PIL RGB image -> (3, H, W) float32 in [0, 1]."""

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Tensor, Target | None]:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        return pixels.permute(2, 0, 1).float().div_(255), target


class Normalize:
    """Standardise the image channels; boxes become cxcywh normalised by the image size."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: Tensor, target: Target | None) -> tuple[Tensor, Target | None]:
        image = (image - self.mean) / self.std
        if target is None:
            return image, None
        h, w = image.shape[-2:]
        boxes = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, {**target, "boxes": boxes}


def make_transforms(cfg: DataConfig, train: bool) -> Compose:
    """DETR's recipe: training flips and multi-scale resizes, with a random resize-crop-resize
    half of the time; evaluation resizes the shorter side to ``val_scale``."""
    finish = [ToTensor(), Normalize()]
    if not train:
        return Compose([RandomResize([cfg.val_scale], cfg.max_size), *finish])
    scale: Transform = RandomResize(cfg.train_scales, cfg.max_size)
    if cfg.random_crop:
        scale = RandomSelect(scale, Compose([
            RandomResize(cfg.crop_scales),
            RandomSizeCrop(*cfg.crop_size),
            RandomResize(cfg.train_scales, cfg.max_size),
        ]))
    flip = [RandomHorizontalFlip()] if cfg.hflip else []
    return Compose([*flip, scale, *finish])
