"""Reading images as 8-bit RGB, whatever mode and orientation they were stored in."""
from __future__ import annotations

from os import PathLike

import numpy as np
from PIL import Image, ImageOps

from detrkit.errors import DatasetError

# Integer modes whose samples span 0..65535 (16-bit PNG / TIFF). Pillow's own conversion to
# "L" clips them at 255 instead of scaling, which turns most 16-bit images white.
_SIXTEEN_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def read_image(path: str | PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image, upright as its EXIF orientation says.

    Grayscale and palette images are expanded to RGB; images with an alpha channel are
    composited on black; 16-bit images are scaled (not clipped) to 8 bits.
    Raises DatasetError naming the file if it is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        samples = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(samples * (255 / 65535)), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        # Transparent pixels often hold arbitrary colours; black is what a viewer on a dark
        # canvas shows and is the same for every file.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")
