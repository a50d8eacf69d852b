"""Pictures: detections drawn on images, and the figures users expect from the DETR paper.

* :func:`draw_detections`: boxes, names and scores on an image.
* :func:`attention_figure`: the encoder self-attention of chosen pixels (the paper's figure 3).
* :func:`query_boxes_figure`: where each object query puts its boxes over a dataset (figure 7).
* :func:`stages_figure`: an image's detections after every decoder stage, side by side.
* :func:`sampling_figure`: Deformable DETR's sampling points and attention weights (its figure 6).

Everything is drawn with PIL and numpy: matplotlib is not a dependency.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import inspect
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from detrkit.analysis import all_stages, class_probabilities, stage_predictions
from detrkit.box_ops import box_cxcywh_to_xyxy
from detrkit.build import uses_focal_loss
from detrkit.data.batch import collate
from detrkit.data.transforms import resized_shape
from detrkit.deformable_attention import MSDeformAttn
from detrkit.errors import DetrkitError
from detrkit.inference import Detections, Detector
from detrkit.transformer import MultiheadAttention, TransformerEncoderLayer, with_pos

Point = tuple[float, float]

# matplotlib's viridis at 0, 1/8, ..., 1; linear in between is indistinguishable from the full table.
VIRIDIS = np.array([[68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140],
                    [40, 174, 128], [94, 201, 98], [173, 220, 48], [253, 231, 37]], dtype=np.float64)

# Figure 7's colour code: green = small boxes, red = large horizontal, blue = large vertical.
SMALL, WIDE, TALL = np.array([0, 160, 0]), np.array([220, 20, 20]), np.array([20, 40, 230])


def color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def colormap(values: np.ndarray) -> np.ndarray:
    """values (...) in [0, 1] -> (..., 3) uint8 viridis colours."""
    x = np.linspace(0.0, 1.0, len(VIRIDIS))
    return np.stack([np.interp(values, x, VIRIDIS[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


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


def grid(panels: Sequence[Image.Image], ncols: int, pad: int = 4) -> Image.Image:
    """Panels laid out row by row on white, each in a cell the size of the largest panel."""
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    nrows = math.ceil(len(panels) / ncols)
    out = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i, panel in enumerate(panels):
        out.paste(panel, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return out


def caption(image: Image.Image, text: str, height: int = 14) -> Image.Image:
    """``image`` under a white strip holding ``text``."""
    out = Image.new("RGB", (image.width, image.height + height), "white")
    out.paste(image, (0, height))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0))
    return out


# ---------------------------------------------------------------- encoder attention (figure 3)

def attention_weights(attn: MultiheadAttention, query: Tensor, key: Tensor,
                      key_padding_mask: Tensor | None = None) -> Tensor:
    """The attention weights of ``attn``, averaged over heads; scaled_dot_product_attention computes
    them but does not return them.

    query: (B, Nq, d); key: (B, Nk, d), positional encodings already added; key_padding_mask:
    (B, Nk), True = ignore. Returns (B, Nq, Nk): rows sum to 1, ignored keys get 0."""
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    q, k = attn._heads(F.linear(query, w_q, b_q)), attn._heads(F.linear(key, w_k, b_k))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)


def _encoder_layer(detector: Detector, layer: int) -> TransformerEncoderLayer:
    layers = detector.model.transformer.encoder.layers
    if not -len(layers) <= layer < len(layers):
        raise DetrkitError(f"layer {layer}: the encoder has {len(layers)} layers")
    if not isinstance(layers[layer], TransformerEncoderLayer):
        raise DetrkitError(f"attention maps need DETR's global-attention encoder, not {type(layers[layer]).__name__}")
    return layers[layer]


@torch.no_grad()
def encoder_attention(detector: Detector, image: Image.Image, layer: int = -1) -> tuple[Tensor, tuple[int, int]]:
    """Self-attention of encoder layer ``layer`` over ``image``'s feature map, averaged over heads.

    Returns ``weights (H*W, H*W)`` on the CPU, row i holding how feature position i (row-major)
    attends to every position, and the feature map's ``(H, W)``."""
    encoder_layer = _encoder_layer(detector, layer)
    inputs = {}

    def keep_inputs(module: TransformerEncoderLayer, args: tuple) -> None:
        inputs["src"], inputs["mask"], inputs["pos"] = args

    tensor, _ = detector.transforms(image.convert("RGB"), None)
    device = next(detector.parameters()).device
    mask = torch.zeros((1, *tensor.shape[-2:]), dtype=torch.bool, device=device)
    handle = encoder_layer.register_forward_pre_hook(keep_inputs)
    try:
        detector.eval()
        detector(tensor[None].to(device), mask)
    finally:
        handle.remove()
    qk = with_pos(inputs["src"], inputs["pos"])
    weights = attention_weights(encoder_layer.self_attn, qk, qk, inputs["mask"])[0]
    # ResNet's stride-2 convolutions and pooling each round the size up.
    stride = detector.model.backbone.strides[-1]
    feature_hw = (math.ceil(tensor.shape[-2] / stride), math.ceil(tensor.shape[-1] / stride))
    return weights.float().cpu(), feature_hw


def attention_maps(detector: Detector, image: Image.Image, points: Sequence[Point],
                   layer: int = -1) -> list[Image.Image]:
    """For each (x, y) point in ``image``'s pixels: the attention from its feature-map cell to all
    cells, stretched from its minimum to its maximum (as the paper's imshow plots are), upsampled
    to the image and overlaid on it, the point marked."""
    image = image.convert("RGB")
    width, height = image.size
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise DetrkitError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    weights, (fh, fw) = encoder_attention(detector, image, layer)
    stride = detector.model.backbone.strides[-1]
    cfg = detector.cfg.data
    # The model sees the image resized to (w_in, h_in); feature cell (i, j) covers its pixels
    # [stride*j, stride*(j+1)) x [stride*i, stride*(i+1)), the last cells reaching past the border.
    w_in, h_in = resized_shape(width, height, cfg.val_scale, cfg.max_size)
    sx, sy = w_in / width / stride, h_in / height / stride
    panels = []
    for i, (x, y) in enumerate(points):
        row = weights[min(int(y * sy), fh - 1) * fw + min(int(x * sx), fw - 1)].view(fh, fw)
        row = (row - row.min()) / (row.max() - row.min() + 1e-12)
        heat = Image.fromarray(row.numpy()).resize(
            image.size, Image.Resampling.BILINEAR, box=(0, 0, w_in / stride, h_in / stride))
        overlay = Image.blend(image, Image.fromarray(colormap(np.clip(np.asarray(heat), 0, 1))), 0.6)
        panels.append(mark_points(overlay, [(x, y)], first_color=i))
    return panels


def mark_points(image: Image.Image, points: Sequence[Point], first_color: int = 0) -> Image.Image:
    """A copy of ``image`` with a ringed dot on each point, coloured ``color(first_color + i)``."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    r = max(3, min(image.size) // 60)
    for i, (x, y) in enumerate(points):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color(first_color + i), outline="white", width=max(1, r // 3))
    return out


def attention_composite(image: Image.Image, points: Sequence[Point], maps: Sequence[Image.Image],
                        max_side: int = 400, ncols: int = 5) -> Image.Image:
    """Figure 3 laid out in rows: the image with every point marked, then each point's map."""
    panels = [mark_points(image.convert("RGB"), points), *maps]
    panels = [ImageOps.contain(p, (max_side, max_side)) for p in panels]
    return grid(panels, min(ncols, len(panels)))


def attention_figure(detector: Detector, image: Image.Image, points: Sequence[Point],
                     layer: int = -1) -> Image.Image:
    """The paper's figure 3 for ``image`` and (x, y) ``points`` in its pixels."""
    return attention_composite(image, points, attention_maps(detector, image, points, layer))


# ---------------------------------------------------------------- query boxes (figure 7)

@torch.no_grad()
def query_boxes(detector: Detector, dataset: Dataset, num_queries: int = 20, min_score: float = 0.0,
                batch_size: int = 4) -> list[Tensor]:
    """Boxes predicted by each of the first ``num_queries`` queries over ``dataset``.

    ``dataset`` yields ``(image (3, H, W), target)`` prepared by ``detector.transforms`` (e.g.
    ``CocoDetection(images, annotations, detector.transforms)``). A prediction counts when its
    score (its best class probability) is at least ``min_score``. Returns per query an (n, 4)
    tensor of cxcywh boxes normalised by the image size."""
    detector.eval()
    device = next(detector.parameters()).device
    boxes, scores = [], []
    for images, mask, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        out = detector(images.to(device), mask.to(device))
        logits = out["pred_logits"][:, :num_queries].float()
        prob = logits.sigmoid() if uses_focal_loss(detector.cfg) else logits.softmax(-1)[..., :-1]
        scores.append(prob.amax(-1).cpu())
        boxes.append(out["pred_boxes"][:, :num_queries].float().cpu())
    boxes, scores = torch.cat(boxes), torch.cat(scores)  # (num_images, K, 4), (num_images, K)
    return [b[s >= min_score] for b, s in zip(boxes.unbind(1), scores.unbind(1))]


def box_colors(boxes: Tensor) -> np.ndarray:
    """boxes (n, 4) cxcywh normalised -> (n, 3) uint8 colours: green for small boxes, turning red as
    large wide boxes grow and blue as large tall ones do."""
    w, h = boxes[:, 2].numpy()[:, None], boxes[:, 3].numpy()[:, None]
    large = np.clip(2 * np.sqrt(w * h), 0, 1)  # boxes with half the image's side or more are "large"
    wide = w / np.maximum(w + h, 1e-6)
    return ((1 - large) * SMALL + large * (wide * WIDE + (1 - wide) * TALL)).round().astype(np.uint8)


def query_panel(boxes: Tensor, size: int = 160, dot: int = 1) -> Image.Image:
    """A ``size`` x ``size`` square standing for the normalised image frame, with a dot of radius
    ``dot`` pixels at the centre of each of ``boxes`` (n, 4) cxcywh, coloured by :func:`box_colors`."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    centres = (boxes[:, :2].clamp(0, 1) * (size - 1)).round().long().numpy()
    colors = box_colors(boxes)
    for dy in range(-dot, dot + 1):
        for dx in range(-dot, dot + 1):
            canvas[np.clip(centres[:, 1] + dy, 0, size - 1), np.clip(centres[:, 0] + dx, 0, size - 1)] = colors
    out = Image.fromarray(canvas)
    ImageDraw.Draw(out).rectangle([0, 0, size - 1, size - 1], outline=(150, 150, 150))
    return out


def query_boxes_figure(detector: Detector, dataset: Dataset, num_queries: int = 20, min_score: float = 0.0,
                       size: int = 160, ncols: int = 5, batch_size: int = 4) -> Image.Image:
    """The paper's figure 7: one panel per query (see :func:`query_boxes` and :func:`query_panel`)."""
    per_query = query_boxes(detector, dataset, num_queries, min_score, batch_size)
    panels = [caption(query_panel(b, size), f"query {q}: {len(b)} boxes") for q, b in enumerate(per_query)]
    return grid(panels, min(ncols, len(panels)))


# ---------------------------------------------------------------- decoder stages


def _run_all_stages(detector: Detector, image: Image.Image) -> tuple[list[dict[str, Tensor]], Tensor]:
    """One forward pass over ``image`` (RGB): every stage's predictions, and the (1, 2) (h, w) size."""
    device = next(detector.parameters()).device
    tensor, _ = detector.transforms(image, None)
    mask = torch.zeros((1, *tensor.shape[-2:]), dtype=torch.bool, device=device)
    detector.eval()
    with all_stages(detector.model):
        outputs = detector(tensor[None].to(device), mask)
    return stage_predictions(outputs), torch.tensor([[image.height, image.width]], device=device)


def _named(detector: Detector, boxes: Tensor, scores: Tensor, labels: Tensor) -> Detections:
    labels = labels.cpu()
    return Detections(boxes=boxes.cpu(), scores=scores.cpu(), labels=labels,
                      category_ids=[detector.categories.to_id(int(lab)) for lab in labels],
                      names=[detector.categories.names[int(lab)] for lab in labels])


@torch.no_grad()
def stage_detections(detector: Detector, image: Image.Image, threshold: float = 0.5) -> list[Detections]:
    """``image``'s detections scored above ``threshold`` after every decoder stage, first to last (the
    last are :meth:`Detector.predict`'s), all from one forward pass."""
    stages, size = _run_all_stages(detector, image.convert("RGB"))
    detections = []
    for predictions in stages:
        det = detector.postprocess(predictions, size)[0]
        keep = det["scores"] > threshold
        detections.append(_named(detector, det["boxes"][keep], det["scores"][keep], det["labels"][keep]))
    return detections


def _fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """``image`` scaled (up or down) so that its longer side is ``max_side``, and the scale factor."""
    factor = max_side / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), factor


def stages_figure(detector: Detector, image: Image.Image, threshold: float = 0.5, max_side: int = 300) -> Image.Image:
    """One panel per decoder stage, captioned "stage i", with that stage's detections: objects found
    early and lost by the last stage show up in the earlier panels only."""
    panels = []
    for i, det in enumerate(stage_detections(detector, image, threshold), 1):
        scaled, factor = _fit(image, max_side)
        panel = draw_detections(scaled, dataclasses.replace(det, boxes=det.boxes * factor))
        panels.append(caption(panel, f"stage {i}: {len(det.scores)} objects"))
    return grid(panels, len(panels))


# ---------------------------------------------------------------- deformable sampling points (figure 6)


def sampling_locations(attn: MSDeformAttn, query: Tensor, reference_points: Tensor,
                       spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Where ``attn`` samples and with which weights (the paper's p_q + Δp_mqk and A_mqk, eq. 3): its
    forward computes them but does not return them. Arguments as for ``attn.forward``.

    Returns locations (B, Q, M, L, P, 2) as (x, y) normalised to each level's map ([0, 1] covers
    it, as ``ms_deform_attn`` reads them) and weights (B, Q, M, L, P), summing to 1 over (L, P)."""
    B, Q, _ = query.shape
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    offsets = attn.sampling_offsets(query).view(B, Q, M, L, P, 2)
    weights = attn.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
    reference = reference_points[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:  # offsets in pixels of each level
        locations = reference + offsets / spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
    else:  # offsets relative to the reference box: half its size at offset n_points
        locations = reference[..., :2] + offsets / P * reference[..., 2:] * 0.5
    return locations, weights


@dataclasses.dataclass
class Sampling:
    """Where one decoder layer's cross-attention looks for each of an image's N queries, in pixels
    of the original image: ``locations (N, M, L, P, 2)`` (x, y) of the M heads' P points on each of
    the L levels, ``weights (N, M, L, P)`` (each head's sum to 1), ``reference (N, 2)`` the
    reference points (centres of the reference boxes with refinement), and ``detections``: each
    query's prediction after that layer (all N, in query order; best class and its score)."""
    locations: Tensor
    weights: Tensor
    reference: Tensor
    detections: Detections
    stage: int  # 1-based decoder stage the layer's pass belongs to


def _deformable_layers(detector: Detector) -> nn.ModuleList:
    model = detector.model
    layers = getattr(getattr(getattr(model, "transformer", None), "decoder", None), "layers", [])
    if not layers or not all(isinstance(getattr(layer, "cross_attn", None), MSDeformAttn) for layer in layers):
        raise DetrkitError(f"sampling points need a Deformable DETR checkpoint (deformable cross-attention in "
                           f"the decoder); this one is a {type(model).__name__}")
    return layers


@torch.no_grad()
def decoder_sampling(detector: Detector, image: Image.Image, layer: int = -1) -> Sampling:
    """The sampling points of decoder layer ``layer``'s cross-attention over ``image`` (its last pass,
    if the decoder runs the layer more than once), captured with forward hooks on the decoder's
    ``MSDeformAttn`` modules and recomputed from their inputs (:func:`sampling_locations`).

    A location x in [0, 1] of level l is sampled at x * W_l cells of that level's map, so at
    x * W_l * stride_l pixels of the image the model saw (a little past its border at x = 1 when
    the feature map was rounded up), then scaled to the original image."""
    layers = _deformable_layers(detector)
    if not -len(layers) <= layer < len(layers):
        raise DetrkitError(f"layer {layer}: the decoder has {len(layers)} layers")
    image = image.convert("RGB")
    calls: list[tuple[int, dict]] = []

    def keep_inputs(index: int):
        def hook(module: MSDeformAttn, args: tuple, kwargs: dict, output: Tensor) -> None:
            calls.append((index, inspect.signature(module.forward).bind(*args, **kwargs).arguments))
        return hook

    handles = [l.cross_attn.register_forward_hook(keep_inputs(i), with_kwargs=True) for i, l in enumerate(layers)]
    try:
        stages, size = _run_all_stages(detector, image)
    finally:
        for handle in handles:
            handle.remove()
    stage = max(k for k, (index, _) in enumerate(calls) if index == layer % len(layers))
    inputs = calls[stage][1]
    attn = layers[layer].cross_attn
    locations, weights = sampling_locations(attn, inputs["query"], inputs["reference_points"],
                                            inputs["spatial_shapes"])

    # normalised level coordinates -> pixels of the transformed image -> pixels of the original
    shapes = inputs["spatial_shapes"].tolist()
    strides = list(detector.model.backbone.strides)
    while len(strides) < len(shapes):  # the extra levels are stride-2 convolutions on the last
        strides.append(2 * strides[-1])
    h_in, w_in = detector.transforms(image, None)[0].shape[-2:]
    to_pixels = torch.tensor([[w * s * image.width / w_in, h * s * image.height / h_in]
                              for (h, w), s in zip(shapes, strides)], dtype=torch.float32)  # (L, 2)
    locations = locations[0].float().cpu() * to_pixels[None, None, :, None, :]
    reference = inputs["reference_points"][0, :, 0, :2].float().cpu() * to_pixels[0]

    predictions = stages[stage]
    probs = class_probabilities(predictions["pred_logits"][0], uses_focal_loss(detector.cfg))
    scores, labels = probs.max(-1)
    boxes = box_cxcywh_to_xyxy(predictions["pred_boxes"][0].float()) * size[0].flip(0).repeat(2).float()
    return Sampling(locations, weights[0].float().cpu(), reference, _named(detector, boxes, scores, labels), stage + 1)


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, level: int, fill: tuple) -> None:
    """Level 0: circle, 1: square, 2: triangle, 3: diamond, then again."""
    shape = level % 4
    if shape == 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == 1:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == 2:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def sampling_panel(image: Image.Image, sampling: Sampling, query: int, max_side: int = 400) -> Image.Image:
    """Query ``query``'s sampling points over ``image`` (dimmed), coloured by attention weight (viridis,
    relative to the query's largest), the largest drawn last; a marker shape per level (circle,
    square, triangle, diamond); the reference point as a white cross and the predicted box."""
    scaled, factor = _fit(image, max_side)
    out = Image.blend(scaled, Image.new("RGB", scaled.size), 0.4)
    draw = ImageDraw.Draw(out)
    det = sampling.detections
    draw.rectangle((det.boxes[query] * factor).tolist(), outline=color(int(det.labels[query])), width=2)
    points = (sampling.locations[query] * factor).flatten(0, 2)  # (M*L*P, 2)
    weights = sampling.weights[query]
    levels = torch.arange(weights.shape[1])[None, :, None].expand_as(weights).flatten()
    weights = weights.flatten()
    fills = colormap((weights / weights.max()).numpy())
    r = max(2.0, max_side / 100)
    for k in weights.argsort().tolist():
        _marker(draw, *points[k].tolist(), r, int(levels[k]), tuple(int(c) for c in fills[k]))
    x, y = (sampling.reference[query] * factor).tolist()
    draw.line([x - 2 * r, y, x + 2 * r, y], fill="white", width=2)
    draw.line([x, y - 2 * r, x, y + 2 * r], fill="white", width=2)
    return out


def sampling_figure(detector: Detector, image: Image.Image, queries: int | Sequence[int] = 5, layer: int = -1,
                    max_side: int = 400, ncols: int = 5) -> Image.Image:
    """Deformable DETR's figure 6: one panel per query (see :func:`sampling_panel`), for the given
    query indices or, given a number K, the K queries scoring highest after layer ``layer``."""
    sampling = decoder_sampling(detector, image, layer)
    det = sampling.detections
    if isinstance(queries, int):
        queries = det.scores.topk(min(queries, len(det.scores))).indices.tolist()
    for q in queries:
        if not 0 <= q < len(det.scores):
            raise DetrkitError(f"query {q}: the model has {len(det.scores)} queries")
    panels = [caption(sampling_panel(image, sampling, q, max_side),
                      f"query {q}: {det.names[q]} {float(det.scores[q]):.2f} (stage {sampling.stage})")
              for q in queries]
    return grid(panels, min(ncols, len(panels)))


# ---------------------------------------------------------------- detrkit viz

def _point(text: str) -> Point:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in image pixels, got {text!r}") from None
    return x, y


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from detrkit.cli import _add_dataset_args
    sub = parser.add_subparsers(dest="figure", required=True)

    p = sub.add_parser("predictions", help="draw a checkpoint's detections on images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.7)
    p.set_defaults(draw=_predictions)

    p = sub.add_parser("attention", help="encoder self-attention of chosen pixels (DETR paper, figure 3)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("image")
    p.add_argument("--points", type=_point, nargs="+", required=True, metavar="X,Y",
                   help="pixels of the original image")
    p.add_argument("--out", required=True)
    p.add_argument("--layer", type=int, default=-1, help="encoder layer (default: the last)")
    p.set_defaults(draw=_attention)

    p = sub.add_parser("query-boxes", help="box centres of each object query over a dataset (DETR paper, figure 7)")
    p.add_argument("--checkpoint", required=True)
    _add_dataset_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--queries", type=int, default=20, help="draw the first K queries")
    p.add_argument("--min-score", type=float, default=0.0, help="drop predictions scored below this")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(draw=_query_boxes)

    p = sub.add_parser("stages", help="an image's detections after every decoder stage, side by side")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.5)
    p.set_defaults(draw=_stages)

    p = sub.add_parser("sampling", help="Deformable DETR's sampling points of chosen queries (its figure 6)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--queries", type=int, default=5, help="draw the K highest-scoring queries")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer (default: the last)")
    p.set_defaults(draw=_sampling)

    for p in sub.choices.values():
        p.add_argument("--device")


def _predictions(detector: Detector, args: argparse.Namespace, out: Path) -> None:
    from detrkit.data.image import read_image
    for path in args.images:
        image = read_image(path)
        draw_detections(image, detector.predict(image, threshold=args.threshold)).save(out / f"{Path(path).stem}.png")
    print(f"wrote {len(args.images)} pictures to {out}")


def _attention(detector: Detector, args: argparse.Namespace, out: Path) -> None:
    from detrkit.data.image import read_image
    image, stem = read_image(args.image), Path(args.image).stem
    maps = attention_maps(detector, image, args.points, args.layer)
    for (x, y), panel in zip(args.points, maps):
        panel.save(out / f"{stem}_attention_{x:g}_{y:g}.png")
    attention_composite(image, args.points, maps).save(out / f"{stem}_attention.png")
    print(f"wrote {out / f'{stem}_attention.png'} and {len(maps)} attention maps")


def _query_boxes(detector: Detector, args: argparse.Namespace, out: Path) -> None:
    from detrkit.cli import _dataset_paths
    from detrkit.data.coco import CocoDetection
    dataset = CocoDetection(*_dataset_paths(args), detector.transforms)
    query_boxes_figure(detector, dataset, args.queries, args.min_score, batch_size=args.batch_size) \
        .save(out / "query_boxes.png")
    print(f"wrote {out / 'query_boxes.png'} ({len(dataset)} images)")


def _stages(detector: Detector, args: argparse.Namespace, out: Path) -> None:
    from detrkit.data.image import read_image
    path = out / f"{Path(args.image).stem}_stages.png"
    stages_figure(detector, read_image(args.image), args.threshold).save(path)
    print(f"wrote {path}")


def _sampling(detector: Detector, args: argparse.Namespace, out: Path) -> None:
    from detrkit.data.image import read_image
    path = out / f"{Path(args.image).stem}_sampling.png"
    sampling_figure(detector, read_image(args.image), args.queries, args.layer).save(path)
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> None:
    from detrkit.inference import load
    detector = load(args.checkpoint, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.draw(detector, args, out)
