"""Inference: ``detrkit.load(path)`` and :meth:`Detector.predict`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detrkit.build import build_postprocess
from detrkit.config import Config
from detrkit.data.batch import pad_images
from detrkit.data.coco import CategoryMap
from detrkit.data.image import read_image
from detrkit.data.transforms import make_transforms
from detrkit.recollection import recurrent_model

ImageInput = Union[str, Path, Image.Image, Tensor]


@dataclass
class Detections:
    """One image's detections: ``boxes`` (n, 4) xyxy in pixels of the original image, ``scores`` (n,),
    ``labels`` (n,) contiguous labels, ``category_ids`` and ``names`` in the dataset's own terms."""
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: list[int]
    names: list[str]


class Detector(nn.Module):
    """A trained detector: ``detector(images, mask)`` runs the model; ``predict`` takes raw images."""

    def __init__(self, model: nn.Module, cfg: Config, categories: CategoryMap):
        super().__init__()
        self.model, self.cfg, self.categories = model, cfg, categories
        self.postprocess = build_postprocess(cfg)
        self.transforms = make_transforms(cfg.data, train=False)

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True = padding."""
        return self.model(images, mask)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.7,
                batch_size: int = 4) -> list[Detections] | Detections:
        """Detect objects in images given as paths, PIL images or (3, H, W) RGB tensors (uint8, or
        float in [0, 1]). Returns one :class:`Detections` per image (a single one for a single image)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        self.eval()
        device = next(self.parameters()).device
        results = []
        for start in range(0, len(images), batch_size):
            pils = [_to_pil(x) for x in images[start:start + batch_size]]
            tensors = [self.transforms(im, None)[0] for im in pils]
            batch, mask = pad_images(tensors)
            outputs = self.model(batch.to(device), mask.to(device))
            sizes = torch.tensor([[im.height, im.width] for im in pils], device=device)
            for det in self.postprocess(outputs, sizes):
                keep = det["scores"] > threshold
                labels = det["labels"][keep].cpu()
                results.append(Detections(
                    boxes=det["boxes"][keep].cpu(), scores=det["scores"][keep].cpu(), labels=labels,
                    category_ids=[self.categories.to_id(int(lab)) for lab in labels],
                    names=[self.categories.names[int(lab)] for lab in labels]))
        return results[0] if single else results


def _to_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        array = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy()))
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def load(path: str | Path, device: str | torch.device | None = None, recurrent_steps: int | None = None,
         **hints) -> Detector:
    """Load a detector from a detrkit model folder, checkpoint folder or training run folder, an
    official DETR / Deformable DETR ``.pth``, or a HuggingFace ``save_pretrained`` folder; the config
    of a foreign checkpoint is read off its weights. ``hints`` (``dilation``, ``nheads``,
    ``num_queries``) give what weights cannot show: see :func:`detrkit.interop.load_model`.

    ``recurrent_steps=T`` loads the single-stage recurrent model, its decoder layer run T times, of
    a model trained with ``model.recollection=recurrent`` or saved by ``detrkit recurrent``
    (:func:`detrkit.recollection.recurrent_model`)."""
    from detrkit.interop import load_model
    model, cfg, categories = load_model(path, **hints)
    if recurrent_steps is not None:
        model, cfg = recurrent_model(model, cfg, recurrent_steps, str(path))
    detector = Detector(model, cfg, categories)
    return detector.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
