"""Pictures: detections drawn on images, and the figures users expect from the papers."""
from __future__ import annotations

import argparse
import colorsys

from PIL import Image, ImageDraw

from detrkit.inference import Detections


def color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, det: Detections, width: int = 2) -> Image.Image:
    """A copy of ``image`` with each detection's box, name and score drawn."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for box, score, label, name in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), det.names):
        c = color(label)
        draw.rectangle(box, outline=c, width=width)
        text = f"{name} {score:.2f}"
        x, y = box[0], max(box[1] - 11, 0)
        tw = draw.textlength(text)
        draw.rectangle([x, y, x + tw + 2, y + 11], fill=c)
        draw.text((x + 1, y), text, fill=(0, 0, 0))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("predictions", help="draw a checkpoint's detections on images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.7)


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from detrkit.data.image import read_image
    from detrkit.inference import load
    detector = load(args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = read_image(path)
        draw_detections(image, detector.predict(image, threshold=args.threshold)).save(out / f"{Path(path).stem}.png")
