"""Linear layers through oneDNN: values and gradients against a float64 ``F.linear``, and the rule
for when they are taken."""

import pytest
import torch
import torch.nn.functional as F

from detrkit.ops import cpu_build
from detrkit.ops import linear as linear_module
from detrkit.ops.linear import Linear, linear


@pytest.fixture(autouse=True)
def onednn(monkeypatch):
    # otherwise these tests would silently check F.linear, which the op falls back to
    if not linear_module.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(linear_module, "MIN_MACS", 1)  # the products here are small


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of the oneDNN calls made while the test runs."""
    calls, onednn = [], linear_module._onednn

    def counted(x, weight, bias, relu=False):
        calls.append(tuple(x.shape))
        return onednn(x, weight, bias, relu)

    monkeypatch.setattr(linear_module, "_onednn", counted)
    return calls


# input shapes (..., C) -> O outputs: batched tokens, a matrix, a single vector; sizes that are not
# multiples of any SIMD width
@pytest.mark.parametrize("shape,out_features", [((2, 37, 24), 40), ((5, 3, 7, 16), 9), ((13, 64), 256), ((33,), 17)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_values_and_gradients_match_a_float64_linear(shape, out_features, with_bias, relu, onednn_calls):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(out_features, dtype=torch.float64) if with_bias else None
    grad = torch.randn(*shape[:-1], out_features, dtype=torch.float64)
    inputs64 = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.linear(x, w, b)
    if relu:
        ref = ref.relu()
        assert 0 < (ref == 0).sum() < ref.numel()  # both sides of the ReLU are exercised
    ref_grads = torch.autograd.grad(ref, inputs64, grad)

    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    y = linear(*inputs32, relu=relu)
    grads = torch.autograd.grad(y, inputs32, grad.float())
    assert y.shape == ref.shape
    assert relative_error(y, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert relative_error(g, r) < 1e-5
    assert len(onednn_calls) == 2  # the forward and the input gradient


def test_strided_inputs_and_weights():
    torch.manual_seed(0)
    x = torch.randn(24, 6, 2).transpose(0, 2)  # (2, 6, 24), not contiguous
    w = torch.randn(24, 10).t()  # (10, 24), a transposed view
    torch.testing.assert_close(linear(x, w), F.linear(x, w))


def test_relu_where_onednn_is_not_taken(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(linear_module, "MIN_MACS", 1 << 62)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    y = linear(x, w, relu=True)
    ref = F.linear(x, w).relu()
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, [x, w], grad), torch.autograd.grad(ref, [x, w], grad)):
        torch.testing.assert_close(g, r)


def test_only_the_gradients_asked_for(onednn_calls):
    torch.manual_seed(0)
    layer = Linear(8, 4)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    grad_x, = torch.autograd.grad(layer(x).square().sum(), [x])
    torch.testing.assert_close(grad_x, torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), [x])[0])
    assert layer.weight.grad is None and layer.bias.grad is None
    layer.bias.requires_grad_(False)
    layer(torch.randn(3, 8)).sum()  # nothing needs a gradient: no autograd node
    assert onednn_calls == [(3, 8), (3, 4), (3, 8)]


def test_taken_only_for_cpu_float32_products_of_min_macs(onednn_calls, monkeypatch):
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    layer(x)
    assert onednn_calls == [(2, 8)]
    monkeypatch.setattr(linear_module, "MIN_MACS", 2 * 8 * 4 + 1)
    layer(x)
    layer.double()(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Linear(8, 4)(x).dtype == torch.bfloat16
    assert Linear(8, 4)(torch.randn(0, 8)).shape == (0, 4)
    assert onednn_calls == [(2, 8)]


def test_same_state_dict_as_nn_linear():
    torch.manual_seed(0)
    ours = Linear(8, 4)
    plain = torch.nn.Linear(8, 4)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), plain(x))


def test_torch_compile_takes_f_linear():
    # inductor cannot lower the oneDNN op with an unpacked weight: a compiled model failed to build
    if not cpu_build.has_compiler():
        pytest.skip("no C++ compiler for inductor")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(layer)
    y, ref = compiled(x, relu=True), layer(x, relu=True)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, [x, layer.weight], grad), torch.autograd.grad(ref, [x, layer.weight], grad)):
        torch.testing.assert_close(g, r)
