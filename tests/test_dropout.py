"""The one-pass CPU dropout: the statistics and the gradient of dropout, reproducible by seed."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from detrkit.ops import cpu_build
from detrkit.ops import dropout as dropout_module
from detrkit.ops.dropout import Dropout, dropout


@pytest.fixture(autouse=True)
def kernel():
    if not cpu_build.has_compiler():
        pytest.skip("no C++ compiler")
    # otherwise these tests would silently check torch's dropout, which the op falls back to
    assert dropout_module.KERNEL.load() is not None, "the dropout kernel failed to build"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest(dtype, p):
    torch.manual_seed(0)
    x = torch.rand(3, 700, 500, dtype=dtype) + 0.5  # no zeros of its own
    y = dropout(x, p, training=True)
    kept = y != 0
    n = x.numel()
    # the dropped fraction is binomial: within 6 standard deviations of p
    assert abs((1 - kept.double().mean().item()) - p) < 6 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_decisions_are_independent_of_position():
    # a weak hash shows up as structure: rows, columns or neighbours that drop together
    torch.manual_seed(1)
    p = 0.3
    keep = (dropout(torch.ones(1000, 1024), p, training=True) != 0).double()
    for means in (keep.mean(0), keep.mean(1)):  # per column (1000 draws), per row (1024 draws)
        n = keep.shape[0] if means.numel() == 1024 else keep.shape[1]
        assert (means - (1 - p)).abs().max() < 6 * (p * (1 - p) / n) ** 0.5
    flat = keep.flatten() - (1 - p)
    for lag in (1, 2, 8, 1024):
        corr = (flat[:-lag] * flat[lag:]).mean() / flat.var()
        assert abs(corr.item()) < 6 / flat.numel() ** 0.5, lag


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(2)
    x = torch.randn(4, 33, 17, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = (y != 0).double()  # x has no zeros, so the output's zeros are the dropped elements
    torch.testing.assert_close(x.grad, grad * mask / 0.75, rtol=1e-12, atol=0)
    torch.autograd.gradcheck(lambda t: dropout_with_seed(t, 0.25), (x.detach().clone().requires_grad_(),))


def dropout_with_seed(x, p):
    torch.manual_seed(3)  # gradcheck evaluates repeatedly: the same mask every time
    return dropout(x, p, training=True)


def test_seeded_by_torch_generator():
    x = torch.ones(10_000)
    torch.manual_seed(5)
    a = dropout(x, 0.5, training=True)
    b = dropout(x, 0.5, training=True)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.5, training=True), a)
    assert not torch.equal(a, b)  # consecutive calls draw new masks


def test_identity_in_eval_and_at_zero_and_torch_elsewhere(monkeypatch):
    x = torch.randn(5, 6)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0, training=True) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    calls, torch_dropout = [], F.dropout
    monkeypatch.setattr(dropout_module.F, "dropout", lambda *a, **k: calls.append(a) or torch_dropout(*a, **k))
    dropout(x.to(torch.bfloat16), 0.5, training=True)  # a dtype the kernel does not take
    assert len(calls) == 1


def test_build_failure_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(dropout_module.KERNEL, "_lib", None)
    monkeypatch.setattr(dropout_module.KERNEL, "_failed", False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    x = torch.ones(1000)
    with pytest.warns(RuntimeWarning, match="torch's dropout"):
        y = dropout(x, 0.5, training=True)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropout(x, 0.5, training=True)


def test_attention_dropout_drops_attention_weights_of_the_plain_formula():
    """DETR's CPU training path for attention with dropout: with v the identity, the output is the
    attention matrix itself, so each entry must be 0 or float64 softmax(q k^T / sqrt(d)) / (1 - p),
    padded keys 0, about a fraction p dropped."""
    from detrkit.transformer import _attention_with_dropout

    torch.manual_seed(0)
    B, heads, Nq, Nk, p = 2, 3, 50, 40, 0.25
    q, k = torch.randn(B, heads, Nq, Nk), torch.randn(B, heads, Nk, Nk)
    v = torch.eye(Nk).expand(B, heads, Nk, Nk)
    padding = torch.zeros(B, Nk, dtype=torch.bool)
    padding[1, 30:] = True
    out = _attention_with_dropout(q, k, v, padding, p).double()
    scores = q.double() @ k.double().transpose(-2, -1) / Nk ** 0.5
    expected = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1) / (1 - p)
    kept = out != 0
    torch.testing.assert_close(out[kept], expected[kept], rtol=1e-5, atol=1e-7)
    assert not kept[1, :, :, 30:].any()
    valid = ~padding[:, None, None, :].expand_as(kept)
    dropped = (~kept[valid]).double().mean().item()
    assert abs(dropped - p) < 6 * (p * (1 - p) / valid.sum().item()) ** 0.5
