import math

import pytest
import torch

from detrkit.config import ConfigError, LossConfig
from detrkit.criterion import SetCriterion, nonfinite_terms
from detrkit.matcher import HungarianMatcher

NUM_CLASSES = 3
TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def make_criterion(class_loss="ce", num_classes=NUM_CLASSES, **kw):
    cfg = LossConfig(class_loss=class_loss, **kw)
    return SetCriterion(num_classes, HungarianMatcher(focal=class_loss == "focal"), cfg)


def random_output(g, batch, num_queries, num_logits):
    return {"pred_logits": torch.randn(batch, num_queries, num_logits, generator=g).requires_grad_(),
            "pred_boxes": (torch.rand(batch, num_queries, 4, generator=g) * 0.5 + 0.2).requires_grad_()}


def make_batch(class_loss, sizes, num_queries=6, num_aux=2, enc=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_logits = NUM_CLASSES + (class_loss == "ce")
    outputs = random_output(g, len(sizes), num_queries, num_logits)
    outputs["aux_outputs"] = [random_output(g, len(sizes), num_queries, num_logits) for _ in range(num_aux)]
    if enc:
        outputs["enc_outputs"] = random_output(g, len(sizes), num_queries, num_logits)
    targets = [{"labels": torch.randint(NUM_CLASSES, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2} for n in sizes]
    return outputs, targets


def giou_by_hand():
    # pred (0.5, 0.5, 0.4, 0.4) -> xyxy (0.3, 0.3, 0.7, 0.7); target (0.6, 0.6, 0.4, 0.4) -> (0.4, 0.4, 0.8, 0.8)
    inter = 0.3 * 0.3
    union = 0.16 + 0.16 - inter
    hull = 0.5 * 0.5
    return inter / union - (hull - union) / hull


BOXES = [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.1, 0.1]]
TARGET = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.6, 0.4, 0.4]])}


def test_cross_entropy_case_by_hand():
    logits = [[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([BOXES])}
    losses = make_criterion("ce", num_classes=2)(outputs, [TARGET])

    # Query 1 is matched to the target (class 0); queries 0 and 2 should be no-object (class 2, weight 0.1).
    def nll(x, t):
        return math.log(sum(math.exp(v) for v in x)) - x[t]
    ce = (0.1 * nll(logits[0], 2) + nll(logits[1], 0) + 0.1 * nll(logits[2], 2)) / 1.2
    l1 = 0.1 + 0.1
    giou = 1 - giou_by_hand()
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(giou, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(1 * ce + 5 * l1 + 2 * giou, rel=1e-5)
    assert losses["class_error"].item() == 0.0  # query 1's argmax is class 0
    assert losses["cardinality_error"].item() == 1.0  # queries 1 and 2 predict an object, 1 target


def test_focal_case_by_hand():
    logits = [[-2.0, -3.0], [1.0, -1.0], [-1.0, 0.5]]
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([BOXES])}
    losses = make_criterion("focal", num_classes=2, ce_coef=2.0)(outputs, [TARGET])

    def focal(x, t, alpha=0.25):
        p = 1 / (1 + math.exp(-x))
        return alpha * (1 - p) ** 2 * -math.log(p) if t else (1 - alpha) * p ** 2 * -math.log(1 - p)
    # Query 1 is matched: only its class-0 entry is a positive. One target box: divide by 1.
    fl = sum(focal(x, (q, c) == (1, 0)) for q, row in enumerate(logits) for c, x in enumerate(row))
    giou = 1 - giou_by_hand()
    assert losses["loss_ce"].item() == pytest.approx(fl, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(giou, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * fl + 5 * 0.2 + 2 * giou, rel=1e-5)
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 1.0  # queries 1 and 2 have a logit > 0


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_invariant_to_query_permutation(class_loss):
    outputs, targets = make_batch(class_loss, [2, 4, 0])
    criterion = make_criterion(class_loss)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))

    def permute(out):
        return {k: out[k][:, perm] for k in ("pred_logits", "pred_boxes")}
    permuted = permute(outputs)
    permuted["aux_outputs"] = [permute(aux) for aux in outputs["aux_outputs"]]
    permuted["enc_outputs"] = permute(outputs["enc_outputs"])
    a, b = criterion(outputs, targets), criterion(permuted, targets)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


class CountingMatcher(HungarianMatcher):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def forward(self, outputs, targets):
        self.calls.append(targets)
        return super().forward(outputs, targets)


@pytest.mark.parametrize("num_aux, enc", [(0, False), (3, False), (5, True)])
def test_every_output_group_is_matched_and_supervised(num_aux, enc):
    outputs, targets = make_batch("ce", [3, 1], num_aux=num_aux, enc=enc)
    matcher = CountingMatcher()
    losses = SetCriterion(NUM_CLASSES, matcher, LossConfig(ce_coef=1.5))(outputs, targets)
    suffixes = [""] + [f"_{i}" for i in range(num_aux)] + ["_enc"] * enc
    assert len(matcher.calls) == len(suffixes)
    assert set(losses) == {t + s for t in TERMS for s in suffixes} | {"loss", "class_error", "cardinality_error"}
    coefs = {"loss_ce": 1.5, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = sum(coefs[t] * losses[t + s] for t in TERMS for s in suffixes)
    torch.testing.assert_close(losses["loss"], expected)
    if enc:  # two-stage proposals are matched class-agnostically
        assert all((t["labels"] == 0).all() for t in matcher.calls[-1])
        assert any((t["labels"] != 0).any() for t in matcher.calls[0])
    for t in matcher.calls[0]:
        assert t["labels"].dtype == torch.int64


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_gradient_reaches_every_group(class_loss):
    outputs, targets = make_batch(class_loss, [2, 3])
    make_criterion(class_loss)(outputs, targets)["loss"].backward()
    for out in [outputs, outputs["enc_outputs"], *outputs["aux_outputs"]]:
        for k in ("pred_logits", "pred_boxes"):
            assert torch.isfinite(out[k].grad).all() and out[k].grad.abs().sum() > 0


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_zero_targets_push_everything_to_no_object(class_loss):
    outputs, targets = make_batch(class_loss, [0, 0])
    losses = make_criterion(class_loss)(outputs, targets)
    assert losses["loss_bbox"].item() == losses["loss_giou"].item() == 0.0
    assert losses["class_error"].item() == 0.0
    losses["loss"].backward()
    grad = outputs["pred_logits"].grad
    logits = outputs["pred_logits"].detach()
    if class_loss == "ce":
        # All weights are eos_coef, so the weighted mean is the plain mean of -log p(no-object).
        expected = -logits.log_softmax(-1)[..., -1].mean()
        assert (grad[..., -1] < 0).all() and (grad[..., :-1] > 0).all()
    else:
        expected = (0.75 * logits.sigmoid() ** 2 * torch.nn.functional.softplus(logits)).sum()  # num_boxes clamped to 1
        assert (grad > 0).all()
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert torch.isfinite(outputs["pred_boxes"].grad).all()


def test_image_without_targets_in_a_batch():
    outputs, targets = make_batch("ce", [0, 2])
    alone = make_batch("ce", [0, 2])[0]
    alone = {k: alone[k][1:] for k in ("pred_logits", "pred_boxes")}
    # Box losses are normalised by the batch's box count, which the empty image does not change.
    losses = make_criterion("ce")({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)
    ref = make_criterion("ce")(alone, targets[1:])
    torch.testing.assert_close(losses["loss_bbox"], ref["loss_bbox"])
    torch.testing.assert_close(losses["loss_giou"], ref["loss_giou"])
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_low_precision_inputs_give_float32_losses(dtype, class_loss):
    outputs, targets = make_batch(class_loss, [2, 3], enc=False, num_aux=1)

    def cast(out, fn):
        return {k: fn(v.detach()) for k, v in out.items() if k != "aux_outputs"}
    low = cast(outputs, lambda v: v.to(dtype))
    low["aux_outputs"] = [cast(a, lambda v: v.to(dtype)) for a in outputs["aux_outputs"]]
    up = cast(low, lambda v: v.float())
    up["aux_outputs"] = [cast(a, lambda v: v.float()) for a in low["aux_outputs"]]
    criterion = make_criterion(class_loss)
    a, b = criterion(low, targets), criterion(up, targets)
    for k in a:
        assert a[k].dtype == torch.float32, k
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    outputs, targets = make_batch("focal", [2, 1], num_aux=0, enc=False)
    criterion = make_criterion("focal")
    local = criterion(outputs, targets)
    # Pretend another process holds 5 boxes: num_boxes = (3 + 5) / 2 = 4 instead of 3.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(5))
    shared = criterion(outputs, targets)
    for k in TERMS:
        torch.testing.assert_close(shared[k] * 4, local[k] * 3, msg=k)


def test_nonfinite_terms_names_the_culprits():
    losses = {"loss_ce": torch.tensor(1.0), "loss_giou_2": torch.tensor(math.inf),
              "loss_bbox_enc": torch.tensor(math.nan), "loss": torch.tensor(math.nan)}
    assert nonfinite_terms(losses) == ["loss_giou_2", "loss_bbox_enc"]
    assert nonfinite_terms({"loss_ce": torch.tensor(0.5), "loss": torch.tensor(0.5)}) == []


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_logits_of_the_wrong_width_are_rejected(class_loss):
    outputs, targets = make_batch("focal" if class_loss == "ce" else "ce", [1, 2])
    with pytest.raises(ValueError, match="pred_logits"):
        make_criterion(class_loss)(outputs, targets)


def test_weight_dict_and_bad_class_loss():
    criterion = make_criterion("focal", ce_coef=2.0, bbox_coef=4.0, giou_coef=3.0)
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_bbox": 4.0, "loss_giou": 3.0}
    with pytest.raises(ConfigError, match="loss.class_loss"):
        make_criterion("softmax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_cuda_bf16_matches_cpu(class_loss):
    outputs, targets = make_batch(class_loss, [2, 0, 3])
    criterion = make_criterion(class_loss)  # deliberately left on the CPU

    def move(out, **kw):
        moved = {k: out[k].detach().to(**kw) for k in ("pred_logits", "pred_boxes")}
        moved["aux_outputs"] = [move(a, **kw) for a in out.get("aux_outputs", [])]
        if "enc_outputs" in out:
            moved["enc_outputs"] = move(out["enc_outputs"], **kw)
        return moved
    on_gpu = move(outputs, device="cuda", dtype=torch.bfloat16)
    gpu = criterion(on_gpu, [{k: v.cuda() for k, v in t.items()} for t in targets])
    cpu = criterion(move(on_gpu, device="cpu", dtype=torch.float32), targets)
    for k in cpu:
        assert gpu[k].dtype == torch.float32 and gpu[k].is_cuda, k
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-4, atol=1e-5, msg=k)
