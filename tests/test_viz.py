"""Pictures: encoder attention weights (figure 3), query box distributions (figure 7), per-stage
detections, deformable sampling points (Deformable DETR figure 6), `detrkit viz`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import detrkit
from detrkit import viz
from detrkit.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from detrkit.build import build_model
from detrkit.checkpoint import save_model
from detrkit.cli import main as cli_main
from detrkit.config import TransformerConfig
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.image import read_image
from detrkit.deformable_attention import MSDeformAttn
from detrkit.errors import DetrkitError
from detrkit.inference import Detections, Detector
from detrkit.ops import ms_deform_attn_reference
from detrkit.presets import PRESETS, detr_small
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


# ---------------------------------------------------------------- decoder stages


@pytest.fixture(scope="module", params=["detr_small", "deformable_detr_small"])
def staged_checkpoint(request: pytest.FixtureRequest, synth_root: Path,
                      tmp_path_factory: pytest.TempPathFactory, untrained_checkpoint) -> Path:
    return untrained_checkpoint(PRESETS[request.param], synth_root, tmp_path_factory.mktemp(request.param) / "model",
                                max_size=128)


def test_stage_detections_are_each_stages_postprocessed_predictions(staged_checkpoint: Path):
    detector = detrkit.load(staged_checkpoint, "cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    stages = viz.stage_detections(detector, image, threshold=0.0)
    assert len(stages) == 2

    # the last stage is what predict returns
    final = detector.predict(image, threshold=0.0)
    torch.testing.assert_close(stages[-1].boxes, final.boxes)
    torch.testing.assert_close(stages[-1].scores, final.scores)
    assert stages[-1].names == final.names
    # the first is the first decoder output, post-processed (computed here from the model's parts)
    tensor, _ = detector.transforms(image, None)
    with torch.no_grad():
        out = detector.model(tensor[None], torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool))
        first = detector.postprocess(out["aux_outputs"][0], torch.tensor([[70, 100]]))[0]
    torch.testing.assert_close(stages[0].boxes, first["boxes"])
    torch.testing.assert_close(stages[0].scores, first["scores"])
    assert not torch.equal(stages[0].boxes, stages[1].boxes)
    # a threshold keeps the detections scored above it
    kept = viz.stage_detections(detector, image, threshold=float(first["scores"].median()))[0]
    assert len(kept.scores) == int((first["scores"] > first["scores"].median()).sum()) > 0


def test_stages_figure_shows_what_each_stage_found(detector: Detector, monkeypatch: pytest.MonkeyPatch):
    """An object found at stage 1 and lost at stage 2 is drawn in the first panel only."""
    found = Detections(boxes=torch.tensor([[10.0, 20.0, 60.0, 50.0]]), scores=torch.tensor([0.9]),
                       labels=torch.tensor([2]), category_ids=[5], names=["thing"])
    lost = Detections(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64),
                      category_ids=[], names=[])
    monkeypatch.setattr(viz, "stage_detections", lambda *args: [found, lost])
    image = Image.new("RGB", (100, 80), (128, 128, 128))
    figure = np.asarray(viz.stages_figure(detector, image, max_side=200)).astype(int)
    # two 200x160 panels under 14-pixel captions, 4 pixels apart
    assert figure.shape == (160 + 14 + 8, 2 * 204 + 4, 3)
    # the box's left edge at x = 10 * 2 (scaled), y from 40 to 100, below the caption
    left_edge = figure[4 + 14 + 60, 4 + 20]
    assert tuple(left_edge) == viz.color(2)
    assert tuple(figure[4 + 14 + 60, 4 + 204 + 20]) == (128, 128, 128)
    captions = figure[4:4 + 14]
    assert (captions[:, 4:204] < 100).any() and (captions[:, 208:408] < 100).any()  # black caption text


def test_viz_stages_cli_writes_one_panel_per_stage(staged_checkpoint: Path, synth_root: Path, tmp_path: Path):
    image_path = next((synth_root / "val" / "images").iterdir())
    assert cli_main(["viz", "stages", "--checkpoint", str(staged_checkpoint), str(image_path),
                     "--threshold", "0", "--out", str(tmp_path)]) == 0
    width, height = read_image(image_path).size
    h = round(height * 300 / width) if width >= height else 300
    w = 300 if width >= height else round(width * 300 / height)
    assert Image.open(tmp_path / f"{image_path.stem}_stages.png").size == (2 * (w + 4) + 4, h + 14 + 8)


# ---------------------------------------------------------------- deformable sampling points


@pytest.mark.parametrize("box_reference", [False, True])
def test_sampling_locations_reproduce_the_modules_output(box_reference: bool):
    """Fed to the sampling op and the output projection, the recomputed locations and weights give
    exactly what MSDeformAttn returned: they are the points it sampled, with its weights."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    with torch.no_grad():
        for linear in (attn.sampling_offsets, attn.attention_weights):
            linear.weight.normal_(0, 0.3)
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 30, 16)
    reference = torch.rand(2, 5, 2, 4 if box_reference else 2) * 0.8 + 0.1
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:24] = True
    with torch.no_grad():
        expected = attn(query, reference, memory, shapes, starts, mask)
        locations, weights = viz.sampling_locations(attn, query, reference, shapes)
        value = attn.value_proj(memory).masked_fill(mask[..., None], 0.0).unflatten(-1, (2, -1))
        out = attn.output_proj(ms_deform_attn_reference(value, shapes, starts, locations, weights))
    assert locations.shape == (2, 5, 2, 2, 3, 2) and weights.shape == (2, 5, 2, 2, 3)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 2))


def test_sampling_locations_at_initialisation_are_the_papers_ring():
    """Zero offset weights: each head's k-th point is k pixels of each level out along its direction."""
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=4, n_points=2)  # directions: right, down, left, up
    shapes = torch.tensor([[10, 20], [5, 10]])
    locations, weights = viz.sampling_locations(attn, torch.randn(1, 1, 8), torch.full((1, 1, 2, 2), 0.5), shapes)
    right_level0_point2 = locations[0, 0, 0, 0, 1]
    up_level1_point1 = locations[0, 0, 3, 1, 0]
    torch.testing.assert_close(right_level0_point2, torch.tensor([0.5 + 2 / 20, 0.5]))
    torch.testing.assert_close(up_level1_point1, torch.tensor([0.5, 0.5 - 1 / 5]))
    torch.testing.assert_close(weights, torch.full((1, 1, 4, 2, 2), 0.25))


@pytest.fixture(scope="module")
def deformable_detector(synth_root: Path, tmp_path_factory: pytest.TempPathFactory,
                        untrained_checkpoint) -> Detector:
    return detrkit.load(untrained_checkpoint(PRESETS["deformable_detr_small_refine"], synth_root,
                                             tmp_path_factory.mktemp("refine") / "model", max_size=128), "cpu")


@pytest.mark.parametrize("layer", [0, -1])
def test_decoder_sampling_captures_the_layers_points_in_image_pixels(deformable_detector: Detector, layer: int):
    """A 192x128 image seen at 96x64: levels of 12x8, 6x4, 3x2 cells at strides 8, 16, 32 cover it
    exactly, so a normalised location x is at 192 x in the original's pixels; the 2x1 cells of the
    stride-64 level reach past the border, to 128 px in the model's view, so there x is at 256 x."""
    detector = deformable_detector
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 192, 3), dtype=np.uint8))
    cross_attn = detector.model.transformer.decoder.layers[layer].cross_attn
    seen = {}

    def keep(module, args, output):
        seen["args"] = args

    handle = cross_attn.register_forward_hook(keep)
    try:
        sampling = viz.decoder_sampling(detector, image, layer)
    finally:
        handle.remove()
    query, reference, _, shapes, *_ = seen["args"]
    assert shapes.tolist() == [[8, 12], [4, 6], [2, 3], [1, 2]]
    assert reference.shape[-1] == (2 if layer == 0 else 4)  # refinement: later layers refine boxes
    locations, weights = viz.sampling_locations(cross_attn, query, reference, shapes)
    to_pixels = torch.tensor([[192.0, 128.0]] * 3 + [[256.0, 128.0]])  # (L, 2)
    torch.testing.assert_close(sampling.locations, locations[0] * to_pixels[:, None, :])
    torch.testing.assert_close(sampling.weights, weights[0])
    torch.testing.assert_close(sampling.reference, reference[0, :, 0, :2] * to_pixels[0])
    assert sampling.stage == (1 if layer == 0 else 2)
    # each query's box is its prediction after that layer
    tensor, _ = detector.transforms(image, None)
    with torch.no_grad():
        out = detector.model(tensor[None], torch.zeros(1, 64, 96, dtype=torch.bool))
    stage = out["aux_outputs"][0] if layer == 0 else out
    torch.testing.assert_close(sampling.detections.boxes,
                               box_cxcywh_to_xyxy(stage["pred_boxes"][0]) * torch.tensor([192.0, 128.0] * 2))
    torch.testing.assert_close(sampling.detections.scores, stage["pred_logits"][0].sigmoid().amax(-1))


def test_sampling_needs_a_deformable_model_and_an_existing_layer(detector: Detector, deformable_detector: Detector):
    image = Image.new("RGB", (96, 64))
    with pytest.raises(DetrkitError, match="need a Deformable DETR checkpoint.*this one is a DETR"):
        viz.decoder_sampling(detector, image)
    with pytest.raises(DetrkitError, match="layer 2: the decoder has 2 layers"):
        viz.decoder_sampling(deformable_detector, image, layer=2)
    with pytest.raises(DetrkitError, match="query 10: the model has 10 queries"):
        viz.sampling_figure(deformable_detector, image, queries=[10])


def test_sampling_panel_colours_points_by_weight():
    """Two sampling points: the heavy one yellow (viridis' top), the light one dark purple, each at its
    place; the predicted box in its label's colour; the reference point a white cross."""
    sampling = viz.Sampling(
        locations=torch.tensor([[20.0, 20.0], [70.0, 60.0]]).view(1, 1, 2, 1, 2),  # (N, M, L, P, 2)
        weights=torch.tensor([0.9, 0.1]).view(1, 1, 2, 1),
        reference=torch.tensor([[50.0, 80.0]]),
        detections=Detections(boxes=torch.tensor([[30.0, 5.0, 90.0, 45.0]]), scores=torch.tensor([0.8]),
                              labels=torch.tensor([1]), category_ids=[3], names=["thing"]),
        stage=2)
    panel = np.asarray(viz.sampling_panel(Image.new("RGB", (100, 100), (200, 200, 200)), sampling, 0,
                                          max_side=100)).astype(int)
    assert tuple(panel[20, 20]) == tuple(viz.colormap(np.array(1.0)))  # weight 0.9 / max 0.9
    assert tuple(panel[60, 70]) == tuple(viz.colormap(np.array(0.1 / 0.9)))
    assert tuple(panel[25, 30]) == viz.color(1)  # the box's left edge
    assert tuple(panel[80, 50]) == (255, 255, 255)
    assert tuple(panel[90, 10]) == (120, 120, 120)  # the image, dimmed


def test_viz_sampling_cli(deformable_detector: Detector, checkpoint: Path, synth_root: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture):
    model_dir = tmp_path / "model"
    save_model(model_dir, deformable_detector.model, deformable_detector.cfg.to_dict(),
               deformable_detector.categories.to_dict())
    image_path = next((synth_root / "val" / "images").iterdir())
    assert cli_main(["viz", "sampling", "--checkpoint", str(model_dir), str(image_path), "--queries", "3",
                     "--layer", "0", "--out", str(tmp_path)]) == 0
    width, height = read_image(image_path).size
    h = round(height * 400 / width) if width >= height else 400
    w = 400 if width >= height else round(width * 400 / height)
    assert Image.open(tmp_path / f"{image_path.stem}_sampling.png").size == (3 * (w + 4) + 4, h + 14 + 8)
    assert cli_main(["viz", "sampling", "--checkpoint", str(checkpoint), str(image_path),
                     "--out", str(tmp_path)]) == 2
    assert "Deformable DETR" in capsys.readouterr().err
