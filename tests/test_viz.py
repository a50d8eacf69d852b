"""Pictures: encoder attention weights (figure 3), query box distributions (figure 7), `detrkit viz`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import detrkit
from detrkit import viz
from detrkit.box_ops import box_xyxy_to_cxcywh
from detrkit.build import build_model
from detrkit.checkpoint import save_model
from detrkit.cli import main as cli_main
from detrkit.config import TransformerConfig
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.image import read_image
from detrkit.errors import DetrkitError
from detrkit.inference import Detector
from detrkit.presets import detr_small
from detrkit.transformer import MultiheadAttention, with_pos


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: synchronising threads costs more than it saves, many times more
    when other processes share the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained DETR (2 encoder layers) saved in detrkit's model format; images are seen at 64 px."""
    torch.manual_seed(0)
    categories = CocoDetection(*resolve_split(synth_root, "val")).categories
    cfg = detr_small()
    cfg.model.num_classes, cfg.model.num_queries = len(categories), 10
    cfg.model.transformer = TransformerConfig(d_model=32, nheads=4, num_encoder_layers=2, num_decoder_layers=1,
                                              dim_feedforward=64, dropout=0.0)
    cfg.data.val_scale, cfg.data.max_size = 64, 128
    return save_model(tmp_path_factory.mktemp("viz") / "model", build_model(cfg).eval(), cfg.to_dict(),
                      categories.to_dict())


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    return detrkit.load(checkpoint, "cpu")


@pytest.fixture(scope="module")
def val_set(synth_root: Path, detector: Detector) -> CocoDetection:
    return CocoDetection(*resolve_split(synth_root, "val"), detector.transforms)


def reference_mha(ours: MultiheadAttention) -> nn.MultiheadAttention:
    d = ours.in_proj_weight.shape[1]
    ref = nn.MultiheadAttention(d, ours.nheads, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    return ref


# ---------------------------------------------------------------- attention weights


def test_attention_weights_match_multihead_attention_with_padding():
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4)
    query, key = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    _, expected = reference_mha(attn)(query, key, key, key_padding_mask=mask, need_weights=True)
    weights = viz.attention_weights(attn, query, key, mask)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert (weights[1, :, 4:] == 0).all()


@pytest.mark.parametrize("layer", [0, -1])
def test_encoder_attention_matches_independent_computation(detector: Detector, layer: int):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    weights, feature_hw = viz.encoder_attention(detector, image, layer)

    # Independently: run the model's parts by hand up to the chosen layer, then nn.MultiheadAttention.
    model = detector.model
    tensor, _ = detector.transforms(image, None)
    with torch.no_grad():
        feature, mask = model.backbone(tensor[None], torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool))[-1]
        pos = model.position_encoding(mask).flatten(2).transpose(1, 2)
        src = model.input_proj(feature).flatten(2).transpose(1, 2)
        layers = model.transformer.encoder.layers
        for encoder_layer in layers[:layer % len(layers)]:
            src = encoder_layer(src, mask.flatten(1), pos)
        qk = with_pos(src, pos)
        _, expected = reference_mha(layers[layer].self_attn)(qk, qk, src, need_weights=True)

    assert feature_hw == tuple(feature.shape[-2:]) == (2, 3)  # 64x91 pixels at stride 32, rounded up
    torch.testing.assert_close(weights, expected[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))


def test_encoder_attention_rejects_a_missing_layer(detector: Detector):
    with pytest.raises(DetrkitError, match="layer 2: the encoder has 2 layers"):
        viz.encoder_attention(detector, Image.new("RGB", (64, 64)), layer=2)


@pytest.mark.parametrize("scale", [1, 2])
def test_attention_map_lights_up_the_attended_cell(detector: Detector, monkeypatch: pytest.MonkeyPatch, scale: int):
    """Each cell attending only to itself: the map of a point is bright over the point's own cell
    and dark elsewhere, in original-image pixels whatever the resize (the model sees 96x64)."""
    monkeypatch.setattr(viz, "encoder_attention", lambda *args: (torch.eye(6), (2, 3)))
    image = Image.new("RGB", (96 * scale, 64 * scale), (128, 128, 128))
    x, y = 40 * scale, 20 * scale  # in cell (row 0, col 1), whose centre is (48, 16) * scale
    panel, = viz.attention_maps(detector, image, [(x, y)])
    assert panel.size == image.size
    green = np.asarray(panel)[..., 1].copy()  # viridis' green rises with the value
    green[y - 5:y + 6, x - 5:x + 6] = 0  # the point's white-ringed marker
    # Bright across its cell's centre row, peaking at the centre; dark at the centres of the cells
    # below it and to its left. Green = 0.4 * 128 + 0.6 * viridis' green (1 at the bottom, 231 at the top).
    assert abs(green[16 * scale].argmax() + 0.5 - 48 * scale) <= 1
    assert green[16 * scale, 48 * scale] > 180
    assert green[48 * scale, 48 * scale] < 60 and green[16 * scale, 16 * scale] < 60


def test_attention_maps_reject_points_outside_the_image(detector: Detector):
    with pytest.raises(DetrkitError, match=r"point \(64, 3\) is outside the 64x48 image"):
        viz.attention_maps(detector, Image.new("RGB", (64, 48)), [(64, 3)])


def test_viz_attention_cli_writes_maps_and_composite(checkpoint: Path, synth_root: Path, tmp_path: Path):
    image_path = next((synth_root / "val" / "images").iterdir())
    width, height = read_image(image_path).size
    assert cli_main(["viz", "attention", "--checkpoint", str(checkpoint), str(image_path),
                     "--points", "10,20", "50.5,30", "--out", str(tmp_path)]) == 0
    for name in ("10_20", "50.5_30"):
        assert Image.open(tmp_path / f"{image_path.stem}_attention_{name}.png").size == (width, height)
    # Three panels (the image with both points, then two maps), each scaled to fit 400x400, in a row.
    w, h = (400, round(height * 400 / width)) if width >= height else (round(width * 400 / height), 400)
    assert Image.open(tmp_path / f"{image_path.stem}_attention.png").size == (3 * (w + 4) + 4, h + 8)


def test_viz_attention_cli_reports_bad_points(checkpoint: Path, synth_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture):
    image_path = next((synth_root / "val" / "images").iterdir())
    assert cli_main(["viz", "attention", "--checkpoint", str(checkpoint), str(image_path),
                     "--points", "5,5000", "--out", str(tmp_path)]) == 2
    assert "outside" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["viz", "attention", "--checkpoint", str(checkpoint), str(image_path), "--points", "5", "--out", "x"])


# ---------------------------------------------------------------- query boxes


def test_query_boxes_are_the_predictions_of_each_query(detector: Detector, val_set: CocoDetection, synth_root: Path):
    # Independently, through Detector.predict (same batches, so the same padding): its detections
    # are one per query, in query order, for a softmax model.
    images = [read_image(synth_root / "val" / "images" / info["file_name"]) for info in val_set.gt["images"]]
    detections = detector.predict(images, threshold=-1.0, batch_size=4)
    scores = torch.stack([d.scores[:4] for d in detections])  # (images, 4)
    min_score = scores.median().item()

    per_query = viz.query_boxes(detector, val_set, num_queries=4, min_score=min_score, batch_size=4)
    assert sum(len(b) for b in per_query) == (scores >= min_score).sum() > 0
    for q, boxes in enumerate(per_query):
        expected = [box_xyxy_to_cxcywh(d.boxes[q]) / torch.tensor([im.width, im.height] * 2)
                    for d, im in zip(detections, images) if d.scores[q] >= min_score]
        torch.testing.assert_close(boxes, torch.stack(expected).reshape(-1, 4), atol=1e-5, rtol=0)


def test_query_panel_draws_one_dot_per_box_coloured_by_size_and_shape():
    boxes = torch.tensor([[0.25, 0.25, 0.05, 0.05],   # small
                          [0.75, 0.25, 0.90, 0.30],   # large, wide
                          [0.25, 0.75, 0.30, 0.90]])  # large, tall
    panel = np.asarray(viz.query_panel(boxes, size=101, dot=1)).astype(int)
    inside = panel[1:-1, 1:-1]  # inside the frame
    assert ((inside != 255).any(-1)).sum() == 3 * 9  # three 3x3 dots
    small, wide, tall = panel[25, 25], panel[25, 75], panel[75, 25]
    assert small.argmax() == 1 and wide.argmax() == 0 and tall.argmax() == 2


def test_viz_query_boxes_cli_writes_a_grid(checkpoint: Path, synth_root: Path, tmp_path: Path):
    assert cli_main(["viz", "query-boxes", "--checkpoint", str(checkpoint), "--data", str(synth_root),
                     "--queries", "7", "--out", str(tmp_path)]) == 0
    # 7 panels of 160x160 under a 14-pixel caption, 5 per row, 4 pixels apart.
    assert Image.open(tmp_path / "query_boxes.png").size == (5 * 164 + 4, 2 * 178 + 4)


def test_viz_predictions_cli_still_draws_images(checkpoint: Path, synth_root: Path, tmp_path: Path):
    image_path = next((synth_root / "val" / "images").iterdir())
    assert cli_main(["viz", "predictions", "--checkpoint", str(checkpoint), str(image_path),
                     "--threshold", "0", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / f"{image_path.stem}.png").size == read_image(image_path).size
