"""Batching images of different sizes: zero padding at the bottom/right plus a padding mask."""
from __future__ import annotations

import torch
from torch import Tensor


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """images: list of (C, H_i, W_i) -> (images (B, C, H, W) zero-padded, mask (B, H, W) bool, True = padding).

    H and W are the largest height and width in the list; each image sits at the top-left.
    """
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for img, padded, m in zip(images, batch, mask):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return batch, mask


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """DataLoader collate_fn: [(image (3, H_i, W_i), target)] -> (images (B, 3, H, W), mask (B, H, W), targets)."""
    images, targets = zip(*batch)
    images, mask = pad_images(list(images))
    return images, mask, list(targets)
