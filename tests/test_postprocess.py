"""detrkit.postprocess against hand computations, a brute-force sort and COCO evaluation."""

import json
import math

import pytest
import torch

from detrkit.evaluation import evaluate
from detrkit.postprocess import PostProcess, PostProcessTopK, to_coco_results

# (h, w): non-square and different per image, so a swapped h/w or image cannot pass.
SIZES = torch.tensor([[480, 640], [300, 200]])


def expected_box(box, size):
    cx, cy, w, h = box
    img_h, img_w = size
    return [(cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h]


def test_postprocess_by_hand():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 5, 4) * 3, torch.rand(2, 5, 4)
    dets = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, SIZES)
    assert len(dets) == 2
    for b, det in enumerate(dets):
        assert det["labels"].dtype == torch.int64
        for q in range(5):
            exp = [math.exp(v) for v in logits[b, q].tolist()]
            probs = [e / sum(exp) for e in exp[:-1]]  # the last class is "no object"
            assert det["labels"][q].item() == probs.index(max(probs))
            assert det["scores"][q].item() == pytest.approx(max(probs), rel=1e-5)
            assert det["boxes"][q].tolist() == pytest.approx(expected_box(boxes[b, q].tolist(), SIZES[b].tolist()),
                                                             rel=1e-5, abs=1e-4)


def test_postprocess_never_picks_no_object():
    logits = torch.tensor([[[0.0, 1.0, 10.0]]])  # "no object" dominates
    det = PostProcess()({"pred_logits": logits, "pred_boxes": torch.rand(1, 1, 4)}, SIZES[:1])[0]
    assert det["labels"].tolist() == [1]


def brute_force_topk(logits, boxes, size, k):
    ranked = sorted(
        ((1 / (1 + math.exp(-logits[q][c])), q, c) for q in range(len(logits)) for c in range(len(logits[0]))),
        reverse=True,
    )[:k]
    return ([s for s, _, _ in ranked], [c for _, _, c in ranked], [expected_box(boxes[q], size) for _, q, _ in ranked])


@pytest.mark.parametrize("k", [7, 1000])  # 1000 > queries * classes: capped
def test_postprocess_topk_brute_force(k):
    torch.manual_seed(1)
    logits, boxes = torch.randn(2, 6, 5) * 2, torch.rand(2, 6, 4)
    dets = PostProcessTopK(k)({"pred_logits": logits, "pred_boxes": boxes}, SIZES)
    for b, det in enumerate(dets):
        scores, labels, xyxy = brute_force_topk(logits[b].tolist(), boxes[b].tolist(), SIZES[b].tolist(), k)
        assert len(det["scores"]) == min(k, 30)
        assert det["scores"].tolist() == pytest.approx(scores, rel=1e-5)
        assert det["labels"].tolist() == labels
        assert det["labels"].dtype == torch.int64
        torch.testing.assert_close(det["boxes"], torch.tensor(xyxy), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("postprocess", [PostProcess(), PostProcessTopK(10)])
def test_low_precision_outputs_give_float32(dtype, postprocess):
    torch.manual_seed(2)
    outputs = {"pred_logits": (torch.randn(2, 8, 4) * 4).to(dtype), "pred_boxes": torch.rand(2, 8, 4).to(dtype)}
    upcast = {key: value.float() for key, value in outputs.items()}
    for det, ref in zip(postprocess(outputs, SIZES), postprocess(upcast, SIZES)):
        for key in ("scores", "boxes"):
            assert det[key].dtype == torch.float32
            torch.testing.assert_close(det[key], ref[key])
        assert torch.equal(det["labels"], ref["labels"])


def test_to_coco_results_coordinates_and_ids():
    dets = [
        {"scores": torch.tensor([0.9, 0.123456789]), "labels": torch.tensor([0, 2]),
         "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [1.234, 2.345, 3.456, 7.891]])},
        {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"scores": torch.tensor([0.5]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])},
    ]
    results = to_coco_results(dets, torch.tensor([42, 7, 9]), [1, 3, 7])
    assert results == [
        {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.9},
        {"image_id": 42, "category_id": 7, "bbox": [1.23, 2.35, 2.22, 5.55], "score": 0.12346},
        {"image_id": 9, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5},
    ]
    assert all(type(v) is float for r in results for v in r["bbox"] + [r["score"]])
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in results)
    assert json.loads(json.dumps(results)) == results
    assert to_coco_results(dets, [42, 7, 9], {0: 1, 1: 3, 2: 7}.__getitem__) == results


def test_to_coco_results_length_mismatch():
    with pytest.raises(ValueError, match="image ids"):
        to_coco_results([], [1], [1])


def test_perfect_predictions_score_ap_one():
    """PostProcess -> to_coco_results -> evaluate: the whole chain agrees with COCO's conventions."""
    category_ids = [1, 3, 7]
    gt = {"images": [{"id": 10 + i, "height": h, "width": w} for i, (h, w) in enumerate(SIZES.tolist())],
          "categories": [{"id": c, "name": str(c)} for c in category_ids], "annotations": []}
    boxes, labels = torch.zeros(2, 3, 4), torch.tensor([[0, 2, 1], [1, 1, 0]])
    for b, (img_h, img_w) in enumerate(SIZES.tolist()):
        for q, (x, y, w, h) in enumerate([(10, 20, 60, 40), (100, 30, 20, 90), (5, 150, 150, 100)]):
            boxes[b, q] = torch.tensor([(x + w / 2) / img_w, (y + h / 2) / img_h, w / img_w, h / img_h])
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 10 + b, "iscrowd": 0,
                                      "category_id": category_ids[labels[b, q]], "bbox": [x, y, w, h], "area": w * h})
    logits = torch.nn.functional.one_hot(labels, 4).float() * 10
    dets = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, SIZES)
    stats = evaluate(gt, to_coco_results(dets, [10, 11], category_ids))
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
