"""Per-stage analysis: stage-wise COCO AP, TP fading and FP exacerbation rates, `detrkit analyze`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import detrkit
from detrkit import analysis
from detrkit.analysis import FadingCounts, evaluate_stages, fading_rates, greedy_match, image_fading
from detrkit.box_ops import box_cxcywh_to_xyxy
from detrkit.build import build_model, uses_focal_loss
from detrkit.checkpoint import save_model
from detrkit.cli import main as cli_main
from detrkit.config import TransformerConfig
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.transforms import make_transforms
from detrkit.engine import evaluate
from detrkit.errors import DetrkitError
from detrkit.inference import Detector
from detrkit.postprocess import PostProcess
from detrkit.presets import deformable_detr_small, detr_small


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["detr", "deformable_detr"])
def checkpoint(request: pytest.FixtureRequest, synth_root: Path, tmp_path_factory: pytest.TempPathFactory,
               untrained_checkpoint) -> Path:
    preset = detr_small if request.param == "detr" else deformable_detr_small
    return untrained_checkpoint(preset, synth_root, tmp_path_factory.mktemp("analysis") / request.param)


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    return detrkit.load(checkpoint, "cpu")


def val_set(synth_root: Path, detector: Detector) -> CocoDetection:
    return CocoDetection(*resolve_split(synth_root, "val"), make_transforms(detector.cfg.data, train=False))


# ---------------------------------------------------------------- TP fading / FP exacerbation, by hand


def xyxy(*boxes) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32)


def test_greedy_match_takes_scores_in_order_and_respects_classes():
    gt_boxes, gt_labels = xyxy([0, 0, 10, 10], [20, 0, 30, 10]), torch.tensor([0, 1])
    boxes = xyxy([0, 0, 10, 10],  # perfect on gt 0, but scored below the next one
                 [0, 0, 10, 9],  # IoU 0.9 with gt 0: takes it first
                 [20, 0, 30, 10],  # perfect on gt 1, wrong class
                 [20, 0, 30, 4])  # class 1, IoU 0.4 with gt 1: below 0.5
    matched = greedy_match(torch.tensor([0.5, 0.9, 0.8, 0.7]), torch.tensor([0, 0, 0, 1]), boxes, gt_boxes, gt_labels)
    assert matched.tolist() == [-1, 0, -1, -1]
    matched = greedy_match(torch.tensor([0.5, 0.9, 0.8, 0.7]), torch.tensor([0, 0, 0, 1]), boxes, gt_boxes, gt_labels,
                           iou_threshold=0.4)
    assert matched.tolist() == [-1, 0, -1, 1]


def test_image_fading_counts_faded_tps_and_exacerbated_fps_exactly():
    """Three stages, two classes, two ground-truth boxes; five queries, their stories by design:

    q0: TP at the last stage; stage 1 had the same class, a better box AND a higher score -> faded.
    q1: TP; stage 1 had a better box but a lower score, stage 2 a higher score but a worse box,
        and a better box with a higher score of the other class -> not faded.
    q2: FP (nothing to match); stage 2 scored its last-stage class lower -> exacerbated.
    q3: FP; scored that class at least as high at every earlier stage -> not exacerbated.
    q4: below the score threshold at the last stage: neither TP nor FP, whatever it did before.
    """
    gt_boxes, gt_labels = xyxy([0, 0, 10, 10], [50, 50, 60, 60]), torch.tensor([0, 1])
    S, N, C = 3, 5, 2
    probs = torch.zeros(S, N, C)
    boxes = torch.zeros(S, N, 4)
    # q0 -> gt 0 (class 0): last IoU 0.8, score 0.6; stage 1: IoU 1, score 0.7, class 0
    probs[:, 0] = torch.tensor([[0.7, 0.1], [0.5, 0.1], [0.6, 0.1]])
    boxes[:, 0] = xyxy([0, 0, 10, 10], [0, 0, 10, 7], [0, 0, 10, 8])
    # q1 -> gt 1 (class 1): last IoU 0.8, score 0.6. Stage 1: a better box (IoU 1) with a lower score;
    # stage 2: a better box and a higher score, but for class 0
    probs[:, 1] = torch.tensor([[0.1, 0.5], [0.95, 0.9], [0.1, 0.6]])
    boxes[:, 1] = xyxy([50, 50, 60, 60], [50, 50, 60, 60], [50, 50, 60, 58])
    # q2: FP of class 1 with score 0.5; stage 2 gave class 1 only 0.3
    probs[:, 2] = torch.tensor([[0.1, 0.6], [0.9, 0.3], [0.2, 0.5]])
    boxes[:, 2] = xyxy([80, 80, 90, 90], [80, 80, 90, 90], [80, 80, 90, 90])
    # q3: FP of class 0 (duplicate of gt 0, taken by q0): score 0.4, earlier 0.4 and 0.8
    probs[:, 3] = torch.tensor([[0.4, 0.0], [0.8, 0.0], [0.4, 0.0]])
    boxes[:, 3] = xyxy([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    # q4: score 0.2 < 0.3 at the last stage
    probs[:, 4] = torch.tensor([[0.9, 0.0], [0.9, 0.0], [0.2, 0.0]])
    boxes[:, 4] = xyxy([0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60])

    counts = image_fading(probs, boxes, gt_boxes, gt_labels, threshold=0.3)
    assert counts == FadingCounts(true_positives=2, faded=1, false_positives=2, exacerbated=1)
    assert counts.tp_fading_rate == 0.5 and counts.fp_exacerbation_rate == 0.5

    # q1 becomes faded once its stage-1 score beats the last stage's
    probs[0, 1, 1] = 0.65
    assert image_fading(probs, boxes, gt_boxes, gt_labels).faded == 2
    # a higher threshold leaves q2 and q3 out (and q0, q1 stay TPs)
    assert image_fading(probs, boxes, gt_boxes, gt_labels, threshold=0.55) == FadingCounts(2, 2, 0, 0)
    # at IoU 0.85 q0 and q1 (0.8) match nothing and become FPs, and q3 (IoU 1) takes gt 0: q3 is a TP
    # that never did better (0.8 > 0.4 at stage 2, but not a better box); q0 (0.5 < 0.6 at stage 2)
    # and q2 are exacerbated, q1 (0.65 and 0.9 for class 1 before) is not
    assert image_fading(probs, boxes, gt_boxes, gt_labels, iou_threshold=0.85) == FadingCounts(1, 0, 3, 2)

def test_fading_counts_add_up_and_report_undefined_rates():
    total = FadingCounts(2, 1, 0, 0) + FadingCounts(2, 0, 4, 1)
    assert total == FadingCounts(4, 1, 4, 1)
    assert total.to_dict() == {"true_positives": 4, "faded": 1, "false_positives": 4, "exacerbated": 1,
                               "tp_fading_rate": 0.25, "fp_exacerbation_rate": 0.25}
    assert math.isnan(FadingCounts().tp_fading_rate)
    assert FadingCounts().to_dict()["fp_exacerbation_rate"] is None
    assert "n/a" in analysis.format_fading(FadingCounts())


# ---------------------------------------------------------------- per-stage AP


class ThreeStageOracle(nn.Module):
    """A softmax "model" that predicts the dataset's own boxes (it is fed its targets in loader order):
    stage 1 exactly, stage 2 at 0.8x the width and height (IoU 0.64), stage 3 at 0.6x (IoU 0.36)."""

    def __init__(self, targets: list[dict], num_classes: int, num_queries: int = 8):
        super().__init__()
        self.targets, self.num_classes, self.num_queries = list(targets), num_classes, num_queries
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(nn.Identity() for _ in range(3))
        self.aux_loss, self.calls = False, 0

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        self.calls += 1
        batch = [self.targets.pop(0) for _ in range(len(images))]
        logits = torch.full((len(batch), self.num_queries, self.num_classes + 1), -10.0)
        logits[..., -1] = 10.0  # unused queries: no object
        boxes = torch.full((len(batch), self.num_queries, 4), 0.5)
        for i, t in enumerate(batch):
            n = len(t["labels"])
            logits[i, torch.arange(n), t["labels"]] = 20.0
            boxes[i, :n] = t["boxes"]
        stages = []
        for scale in (1.0, 0.8, 0.6):
            b = boxes.clone()
            b[..., 2:] *= scale
            stages.append({"pred_logits": logits, "pred_boxes": b})
        out = dict(stages[-1])
        if self.aux_loss:
            out["aux_outputs"] = stages[:-1]
        return out


def test_stage_aps_score_each_stage_from_one_forward_pass(synth_root: Path):
    dataset = CocoDetection(*resolve_split(synth_root, "val"), make_transforms(detr_small().data, train=False))
    targets = [dataset[i][1] for i in range(len(dataset))]
    assert sum(len(t["labels"]) for t in targets) > 0
    args = (PostProcess(), dataset, dataset.categories, torch.device("cpu"), 3)

    model = ThreeStageOracle(targets, len(dataset.categories))
    stages = evaluate_stages(model, *args)
    assert model.calls == math.ceil(len(dataset) / 3)  # one forward pass per batch, not one per stage
    assert model.aux_loss is False  # restored
    assert [s["AP50"] for s in stages] == [1.0, 1.0, 0.0]
    assert [s["AP75"] for s in stages] == [1.0, 0.0, 0.0]
    assert stages[0]["AP"] == 1.0 and 0 < stages[1]["AP"] < 1 and stages[2]["AP"] == 0.0
    assert stages[-1] == evaluate(ThreeStageOracle(targets, len(dataset.categories)), *args)

    table = analysis.format_stage_table(stages).splitlines()
    assert table[0].split() == ["stage", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                "ARs", "ARm", "ARl"]
    assert table[1].split()[:4] == ["1", "1.000", "1.000", "1.000"]
    assert table[3].split()[:4] == ["3", "0.000", "0.000", "0.000"]


class OneStage(nn.Module):
    """``model`` answering with decoder stage ``stage``'s predictions as its main output."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        with analysis.all_stages(self.model):
            return analysis.stage_predictions(self.model(images, mask))[self.stage - 1]


def test_stage_aps_of_real_models_match_evaluating_each_stage_alone(detector: Detector, synth_root: Path):
    dataset = val_set(synth_root, detector)
    model, device = detector.model, torch.device("cpu")
    model.aux_loss = False  # as a model trained without auxiliary losses: its stages are still there
    try:
        stages = evaluate_stages(model, detector.postprocess, dataset, detector.categories, device, 4)
        assert len(stages) == 2
        assert stages[-1] == evaluate(model, detector.postprocess, dataset, detector.categories, device, 4)
        assert stages[0] == evaluate(OneStage(model, 1), detector.postprocess, dataset, detector.categories, device, 4)
    finally:
        model.aux_loss = True


def test_fading_rates_of_a_real_model_follow_its_predictions(detector: Detector, synth_root: Path):
    dataset = val_set(synth_root, detector)
    focal = uses_focal_loss(detector.cfg)
    counts = fading_rates(detector.model, dataset, torch.device("cpu"), focal, threshold=0.0, batch_size=4)
    # with no threshold every query of every image is a TP or an FP
    assert counts.true_positives + counts.false_positives == len(dataset) * 10

    # independently: one image at a time, the stages stacked by hand
    expected = FadingCounts()
    with torch.no_grad(), analysis.all_stages(detector.model):
        for i in range(len(dataset)):
            image, target = dataset[i]
            out = detector.model(image[None], torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
            stages = [*out["aux_outputs"], out]
            probs = torch.stack([analysis.class_probabilities(s["pred_logits"][0], focal) for s in stages])
            boxes = torch.stack([box_cxcywh_to_xyxy(s["pred_boxes"][0]) for s in stages])
            expected += image_fading(probs, boxes, box_cxcywh_to_xyxy(target["boxes"]), target["labels"], 0.3)
    assert fading_rates(detector.model, dataset, torch.device("cpu"), focal, batch_size=1) == expected


def test_stage_count_mismatch_is_a_clear_error():
    with pytest.raises(DetrkitError, match="returned 2 sets of predictions for its 3 decoder stages"):
        analysis._checked([{}, {}], 3)


# ---------------------------------------------------------------- CLI


def test_eval_per_stage_and_analyze_cli(checkpoint: Path, synth_root: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture):
    assert cli_main(["eval", "--per-stage", "--checkpoint", str(checkpoint), "--data", str(synth_root),
                     "--json", str(tmp_path / "stages.json"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["stage", "AP", "AP50", "AP75"] and [l.split()[0] for l in lines[1:]] == ["1", "2"]
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert len(stages) == 2 and set(stages[0]) >= {"AP", "AP50", "AP75", "ARl"}

    assert cli_main(["analyze", "--checkpoint", str(checkpoint), "--data", str(synth_root), "--threshold", "0",
                     "--json", str(tmp_path / "rates.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "TP F Rate" in out and "FP E Rate" in out and "last stage of 2 over 8 images" in out
    rates = json.loads((tmp_path / "rates.json").read_text())
    assert rates["true_positives"] + rates["false_positives"] == 8 * 10


def test_eval_per_stage_needs_a_checkpoint(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "results.json").write_text("[]")
    assert cli_main(["eval", "--per-stage", "--predictions", str(tmp_path / "results.json"),
                     "--data", str(synth_root)]) == 2
    assert "--per-stage needs --checkpoint" in capsys.readouterr().err
