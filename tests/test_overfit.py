"""Tiny DETR and Deformable DETR models learn four images by heart, padding in a batch does not
change their answers, and the two-stage decoder improves on the encoder's proposals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from detrkit import config, presets
from detrkit.box_ops import box_cxcywh_to_xyxy, box_iou
from detrkit.build import build_criterion
from detrkit.data.batch import collate
from detrkit.data.coco import CocoDetection
from detrkit.data.synth import SHAPES, shape_mask
from detrkit.data.transforms import make_transforms
from detrkit.engine import Run, evaluate

CPU = torch.device("cpu")
STEPS_PER_EPOCH = 50


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The trained weights depend on float rounding, which depends on the thread count: pin it so
    the model (and so these tests) are the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (width, height), [(class, x, y, w, h)]: four sizes, so every batch of them is padded.
IMAGES = [
    ((80, 64), [(0, 8, 8, 40, 40), (1, 50, 20, 24, 36)]),
    ((64, 80), [(1, 10, 30, 44, 40)]),
    ((72, 72), [(2, 30, 6, 36, 30), (0, 4, 40, 28, 28)]),
    ((96, 64), [(1, 4, 4, 30, 30), (2, 50, 24, 40, 36)]),
]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four hand-placed images of large solid shapes on grey (category ids 1, 3, 5)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    images, annotations = [], []
    for i, ((w, h), objects) in enumerate(IMAGES):
        pixels = np.full((h, w, 3), 128, np.uint8)
        for cls, x, y, bw, bh in objects:
            pixels[y:y + bh, x:x + bw][shape_mask(SHAPES[cls], bw, bh)] = COLOURS[cls]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 2 * cls + 1,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
    categories = [{"id": 2 * k + 1, "name": SHAPES[k]} for k in range(len(COLOURS))]
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


def train_on_shapes(cfg, shapes_root: Path, run_dir: Path) -> Path:
    """Train ``cfg`` on the four images, STEPS_PER_EPOCH full batches per epoch; return the run folder."""
    train = CocoDetection(shapes_root / "images", shapes_root / "annotations.json",
                          make_transforms(cfg.data, train=True))
    repeated = torch.utils.data.ConcatDataset([train] * STEPS_PER_EPOCH)
    Run(cfg, train.categories, run_dir, CPU).train(repeated, None, log_every=STEPS_PER_EPOCH, echo=lambda s: None)
    return run_dir


def stats_on_shapes(run_dir: Path, shapes_root: Path) -> dict:
    """COCO stats of the run's model on the four images it learnt."""
    detector = detrkit.load(run_dir, "cpu")
    dataset = CocoDetection(shapes_root / "images", shapes_root / "annotations.json",
                            make_transforms(detector.cfg.data, train=False))
    return evaluate(detector.model, detector.postprocess, dataset, detector.categories, CPU, batch_size=4)


DEFORMABLE_OVERRIDES = [
    "model.transformer.d_model=64", "model.transformer.nheads=4", "model.transformer.dim_feedforward=128",
    "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=3", "model.num_queries=10",
    "data.train_scales=[96]", "data.val_scale=96", "data.max_size=128", "data.hflip=false",
    "data.random_crop=false", "data.num_workers=0", "train.batch_size=4", "train.epochs=3", "train.lr=1e-3",
    "train.lr_backbone=1e-3", "train.eval_every=0", "train.seed=0",
]


@pytest.fixture(scope="module", params=["detr_small", "deformable_detr_small", "deformable_detr_small_refine",
                                        "deformable_detr_small_two_stage"])
def trained_run(request, shapes_root, tiny_config, tmp_path_factory) -> Path:
    """A run folder after full-batch training on the four images (no augmentation, fixed seed):
    the tiny DETR or a Deformable DETR variant for 150 steps."""
    if request.param == "detr_small":
        # 150 steps, not 100: after 100, for some seeds (4 of 15 measured) and float roundings the
        # tiny DETR still scores some objects near 0.5, and on these 64-96 px images, where every
        # feature of its stride-32 map touches the padded edge, such a score moves with the padding
        # (0.52 alone, under 0.3 padded, measured with direct and Winograd convolutions alike).
        # After 150 steps seeds 1, 2 and 3 all pass.
        cfg = tiny_config("data.train_scales=[64]", "data.hflip=false", "data.random_crop=false",
                          "train.batch_size=4", "train.epochs=3", "train.lr=1e-3", "train.lr_backbone=1e-3",
                          "train.eval_every=0", "train.seed=1")
    else:
        cfg = config.apply_overrides(presets.preset(request.param), DEFORMABLE_OVERRIDES)
    return train_on_shapes(cfg, shapes_root, tmp_path_factory.mktemp(request.param))


def test_model_overfits_four_images(trained_run, shapes_root):
    stats = stats_on_shapes(trained_run, shapes_root)
    assert stats["AP50"] >= 0.9, stats


def test_image_alone_and_padded_in_a_batch_give_the_same_detections(trained_run, shapes_root):
    detector = detrkit.load(trained_run, "cpu")
    paths = [shapes_root / "images" / f"{i}.png" for i in range(len(IMAGES))]
    alone = [detector.predict(p, threshold=0.3) for p in paths]
    batched = detector.predict(paths, threshold=0.3, batch_size=len(paths))  # padded to the largest
    for a, b in zip(alone, batched):
        assert len(a.scores) and len(b.scores)
        for first, second in ((a, b), (b, a)):
            # every detection scored 0.5 or more, and the image's best one
            compared = (first.scores >= 0.5) | (first.scores == first.scores.max())
            for box, score, label in zip(first.boxes[compared], first.scores[compared], first.labels[compared]):
                # Close, not equal: at the image's bottom and right edges the backbone's convolutions
                # see the padding's features instead of zeros and, in Deformable DETR, the GroupNorm
                # of the input projections averages over the padding too (as in the paper's code).
                # Measured: boxes within 0.6 px, scores within 0.015 (0.04 two-stage, whose queries
                # are the top encoder proposals). With the mask ignored (all False), every variant
                # fails here: a score moves by 0.35 or more, or a detection appears or vanishes.
                same = ((second.labels == label) & ((second.boxes - box).abs().max(-1).values <= 2.0)
                        & ((second.scores - score).abs() <= 0.1))
                assert same.any(), (box, score, label, second.boxes, second.scores, second.labels)


def box_quality_per_layer(detector: detrkit.Detector, shapes_root: Path) -> list[float]:
    """For a two-stage model: mean IoU with its object of each query the last layer matches
    (Hungarian, as in training), followed back through the layers: that query's encoder proposal
    (the decoder's input box), then its box after each decoder layer."""
    dataset = CocoDetection(shapes_root / "images", shapes_root / "annotations.json",
                            make_transforms(detector.cfg.data, train=False))
    images, mask, targets = collate([dataset[i] for i in range(len(dataset))])
    proposals = []
    hook = detector.model.transformer.decoder.register_forward_hook(lambda m, args, out: proposals.append(args[1]))
    with torch.no_grad():
        out = detector.model(images, mask)
    hook.remove()
    layers = [proposals[0]] + [o["pred_boxes"] for o in out["aux_outputs"]] + [out["pred_boxes"]]
    matched = build_criterion(detector.cfg).matcher(out, targets)
    quality = []
    for boxes in layers:
        ious = [box_iou(box_cxcywh_to_xyxy(boxes[b, q]), box_cxcywh_to_xyxy(t["boxes"][o]))[0].diagonal()
                for b, ((q, o), t) in enumerate(zip(matched, targets))]
        quality.append(torch.cat(ious).mean().item())
    return quality


def test_decoder_layers_improve_on_the_two_stage_proposals(trained_run, shapes_root):
    detector = detrkit.load(trained_run, "cpu")
    if not detector.cfg.model.two_stage:
        # Refinement from learned reference points: on four memorised images the first layer is
        # already as good as the later ones (measured 0.915, 0.913, 0.913), so nothing to assert.
        pytest.skip("no encoder proposals to improve on")
    proposals, *layers = box_quality_per_layer(detector, shapes_root)
    # Measured, proposals -> layers: 0.915 -> 0.937, 0.932, 0.929; after changes of the training's
    # float rounding, 0.941 -> 0.946, 0.943, 0.945 and 0.939 -> 0.943, 0.940, 0.934. On four
    # memorised images the proposals are nearly exact already and which later layer comes out best is
    # a matter of rounding; the first layer's refinement gains every time. (On held-out images the
    # gain is larger, see the README.)
    assert layers[0] > proposals, (proposals, layers)
    assert all(layer > proposals - 0.01 for layer in layers), (proposals, layers)
