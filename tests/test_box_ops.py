import itertools

import pytest
import torch

from detrkit.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                             generalized_box_iou, paired_generalized_box_iou)


def ref_iou_giou(a, b):
    """IoU and GIoU of two xyxy boxes as Python floats; a zero denominator gives 0."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union if union else 0.0
    return iou, iou - ((hull - union) / hull if hull else 0.0)


# Degenerate and hand-checkable cases: zero width, zero height, a point, identical,
# disjoint, touching, nested, partly overlapping.
SPECIAL = [
    [0.0, 0.0, 1.0, 1.0],
    [0.0, 0.0, 1.0, 1.0],
    [0.25, 0.25, 0.5, 0.5],
    [2.0, 2.0, 3.0, 4.0],
    [1.0, 0.0, 2.0, 1.0],
    [0.5, 0.5, 1.5, 1.5],
    [0.3, 0.3, 0.3, 0.9],
    [0.3, 0.3, 0.9, 0.3],
    [0.3, 0.3, 0.3, 0.3],
    [0.3, 0.3, 0.3, 0.3],
    [5.0, 5.0, 5.0, 5.0],
]


def random_xyxy(n, generator):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return torch.cat([xy, xy + wh], -1)


def test_conversions_known_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6], [0.1, 0.1, 0.0, 0.0]])
    xyxy = torch.tensor([[0.4, 0.1, 0.6, 0.7], [0.1, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    batched = torch.rand(2, 5, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([0.12, 0.0]))


def test_pairwise_iou_and_giou_match_reference():
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), random_xyxy(9, g)])
    iou, union = box_iou(boxes, boxes[:7])
    giou = generalized_box_iou(boxes, boxes[:7])
    assert iou.shape == union.shape == giou.shape == (len(boxes), 7)
    for i, j in itertools.product(range(len(boxes)), range(7)):
        ref_iou, ref_giou = ref_iou_giou(boxes[i].tolist(), boxes[j].tolist())
        assert iou[i, j].item() == pytest.approx(ref_iou, abs=1e-12), (i, j)
        assert giou[i, j].item() == pytest.approx(ref_giou, abs=1e-12), (i, j)
    assert union[0, 3].item() == pytest.approx(1.0 + 2.0)  # disjoint: sum of areas


def test_hand_checked_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    cases = {  # box: (iou, giou)
        (0.0, 0.0, 1.0, 1.0): (1.0, 1.0),
        (0.25, 0.25, 0.5, 0.5): (1 / 16, 1 / 16),  # nested: the hull is the outer box
        (2.0, 0.0, 3.0, 1.0): (0.0, -1 / 3),  # disjoint: hull 3, union 2
        (0.5, 0.0, 1.5, 1.0): (1 / 3, 1 / 3),
    }
    for box, (iou, giou) in cases.items():
        b = torch.tensor([box])
        assert box_iou(a, b)[0].item() == pytest.approx(iou)
        assert generalized_box_iou(a, b).item() == pytest.approx(giou)


def test_paired_equals_diagonal():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(6, g), random_xyxy(6, g)
    torch.testing.assert_close(paired_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal())


def test_degenerate_boxes_have_finite_values_and_gradients():
    boxes = torch.tensor(SPECIAL, requires_grad=True)
    giou = generalized_box_iou(boxes, boxes)
    iou, _ = box_iou(boxes, boxes)
    (giou.sum() + iou.sum()).backward()
    assert torch.isfinite(giou).all() and torch.isfinite(iou).all()
    assert torch.isfinite(boxes.grad).all()
    assert giou[-2, -3].item() == 0.0  # identical points: 0 by convention, not NaN
    assert giou[-1, -2].item() == -1.0  # distinct points: nothing shared, all of the hull empty


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype(dtype):
    boxes = torch.tensor(SPECIAL[:6], dtype=dtype)
    giou = generalized_box_iou(boxes, boxes)
    assert giou.dtype == dtype
    torch.testing.assert_close(giou.float(), generalized_box_iou(boxes.float(), boxes.float()),
                               atol=2e-2, rtol=0)
