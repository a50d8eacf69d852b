import itertools
import math

import pytest
import torch

from detrkit.errors import DetrkitError
from detrkit.matcher import HungarianMatcher

NUM_CLASSES = 3


def ref_giou(a, b):
    """GIoU of two cxcywh boxes (Python floats)."""
    a = [a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2]
    b = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def ref_cost(logits, box, label, tgt_box, weights, focal, alpha=0.25, gamma=2.0):
    """Matching cost of one (prediction, target) pair, in float64 Python arithmetic."""
    w_class, w_bbox, w_giou = weights
    if focal:
        p = 1 / (1 + math.exp(-logits[label]))
        c = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    else:
        c = -math.exp(logits[label]) / sum(math.exp(x) for x in logits)
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))
    return w_class * c + w_bbox * l1 - w_giou * ref_giou(box, tgt_box)


def make_batch(num_queries, sizes, focal, seed):
    g = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    outputs = {
        "pred_logits": 2 * torch.randn(batch, num_queries, NUM_CLASSES + (not focal), generator=g),
        "pred_boxes": torch.rand(batch, num_queries, 4, generator=g) * 0.5 + 0.2,
    }
    targets = [{"labels": torch.randint(NUM_CLASSES, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2} for n in sizes]
    return outputs, targets


CASES = [(1, [1]), (3, [0, 3]), (4, [2, 4, 1]), (5, [5, 3]), (5, [0, 0]), (2, [2, 1, 0, 2])]


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 5.0, 2.0), (2.0, 0.5, 3.0)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_assignment_is_optimal_against_brute_force(focal, weights, case):
    num_queries, sizes = CASES[case]
    outputs, targets = make_batch(num_queries, sizes, focal, seed=case)
    matcher = HungarianMatcher(*weights, focal=focal)
    indices = matcher(outputs, targets)
    assert len(indices) == len(sizes)
    for i, ((pred_idx, tgt_idx), t) in enumerate(zip(indices, targets)):
        n = len(t["labels"])
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert sorted(tgt_idx.tolist()) == list(range(n))
        assert len(set(pred_idx.tolist())) == n and all(0 <= q < num_queries for q in pred_idx.tolist())
        cost = [[ref_cost(outputs["pred_logits"][i, q].tolist(), outputs["pred_boxes"][i, q].tolist(),
                          t["labels"][j].item(), t["boxes"][j].tolist(), weights, focal)
                 for j in range(n)] for q in range(num_queries)]
        best = min(sum(cost[q][j] for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), n))
        got = sum(cost[q][j] for q, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
        assert got == pytest.approx(best, abs=1e-4)


def test_obvious_match_follows_boxes_and_classes():
    # Query 2 sits on target 0 with its class, query 0 on target 1: the matcher must find both.
    outputs = {"pred_logits": torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]]),
               "pred_boxes": torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])}]
    (pred_idx, tgt_idx), = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 2, 1: 0}


def test_more_targets_than_queries_is_a_clear_error():
    outputs, targets = make_batch(2, [1, 3], focal=False, seed=0)
    with pytest.raises(DetrkitError, match=r"image 1 .*3 target boxes.*only 2 queries"):
        HungarianMatcher()(outputs, targets)


@pytest.mark.parametrize("key", ["pred_boxes", "pred_logits"])
def test_nonfinite_predictions_are_a_clear_error(key):
    outputs, targets = make_batch(4, [2, 2], focal=True, seed=0)
    outputs[key][1, 3] = float("nan")
    with pytest.raises(DetrkitError, match=rf"image 1 .*{key} contain NaN"):
        HungarianMatcher(focal=True)(outputs, targets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_match_like_float32(dtype):
    outputs, targets = make_batch(5, [3, 5], focal=False, seed=3)
    low = {k: v.to(dtype) for k, v in outputs.items()}
    upcast = {k: v.float() for k, v in low.items()}
    matcher = HungarianMatcher()
    for (p1, t1), (p2, t2) in zip(matcher(low, targets), matcher(upcast, targets)):
        assert p1.tolist() == p2.tolist() and t1.tolist() == t2.tolist()
