"""Winograd F(4x4, 3x3) convolutions: values and gradients against a float64 direct convolution,
and the rule for when the backbone takes them."""

import pytest
import torch
import torch.nn.functional as F

from detrkit.backbone import Backbone
from detrkit.config import BackboneConfig
from detrkit.ops import cpu_build, winograd
from detrkit.ops.winograd import _Winograd, applies, conv2d

CL = torch.channels_last


@pytest.fixture(autouse=True)
def kernel():
    if not cpu_build.has_compiler():
        pytest.skip("no C++ compiler")
    # otherwise these tests would silently check F.conv2d, which the op falls back to
    assert winograd.KERNEL.load() is not None, "the Winograd kernels failed to build"


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


# (B, C_in, C_out, H, W): heights and widths that are and are not multiples of the 4x4 tile,
# channel counts that are and are not multiples of the kernels' 16-channel blocks, a 1x1 map;
# (2, 32, 16), (1, 16, 48) and (1, 144, 32) through the fused kernel, with tile counts that are
# not multiples of its blocks of tiles.
@pytest.mark.parametrize("shape", [(2, 32, 16, 16, 16), (1, 16, 48, 13, 27), (2, 20, 24, 7, 9), (1, 3, 5, 1, 1),
                                   (3, 17, 40, 13, 6), (1, 144, 32, 9, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_a_float64_direct_convolution(shape, with_bias):
    torch.manual_seed(0)
    B, C, O, H, W = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, dtype=torch.float64) / (3 * C ** 0.5)
    b = torch.randn(O, dtype=torch.float64) if with_bias else None
    grad = torch.randn(B, O, H, W, dtype=torch.float64)

    inputs64 = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv2d(x, w, b, padding=1)
    ref_grads = torch.autograd.grad(ref, inputs64, grad)

    x32 = x.detach().float().contiguous(memory_format=CL).requires_grad_()
    w32 = w.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_() if with_bias else None
    y = _Winograd.apply(x32, w32, b32)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
    grads = torch.autograd.grad(y, [t for t in (x32, w32, b32) if t is not None], grad.float())
    # float32 direct convolutions are at about 1e-6 here; Winograd's transforms, with
    # coefficients up to 8, at about 6e-6
    assert relative_error(y, ref) < 3e-5
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert relative_error(g, r) < 3e-5


def test_only_the_gradients_asked_for():
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=CL)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    grad_w, = torch.autograd.grad(_Winograd.apply(x, w, None).sum(), [w])
    torch.testing.assert_close(grad_w, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), [w])[0],
                               rtol=1e-4, atol=1e-4)


def test_taken_only_where_it_applies():
    x = torch.randn(1, 128, 12, 12).contiguous(memory_format=CL)
    w = torch.randn(128, 128, 3, 3)
    assert applies(x, w, 1, 1, 1, 1)
    assert applies(x, w, (1, 1), (1, 1), (1, 1), 1)
    assert not applies(x, w, 2, 1, 1, 1)  # strided
    assert not applies(x, w, 1, 2, 2, 1)  # dilated (DC5)
    assert not applies(x, w, 1, 0, 1, 1)  # no padding
    assert not applies(x.contiguous(), w, 1, 1, 1, 1)  # channels-first input
    assert not applies(x.double(), w.double(), 1, 1, 1, 1)
    x64, x32 = (torch.randn(1, c, 12, 12).contiguous(memory_format=CL) for c in (64, 32))
    assert applies(x64, w[:64, :64], 1, 1, 1, 1) and not applies(x32, w[:32, :32], 1, 1, 1, 1)
    # the fused kernel for up to 128 x 128 filters in blocks of 16 channels
    assert winograd.fuses(64, 64) and winograd.fuses(128, 128) and winograd.fuses(16, 48) and winograd.fuses(144, 32)
    assert not winograd.fuses(256, 256) and not winograd.fuses(20, 24)
    assert not applies(torch.randn(1, 512, 12, 12).contiguous(memory_format=CL), torch.randn(512, 512, 3, 3),
                       1, 1, 1, 1)  # layer4's filters: their Winograd-domain copy costs more than it saves
    assert not applies(x, w[:, :, :1, :1], 1, 0, 1, 1)  # 1x1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies(x, w, 1, 1, 1, 1)
    # and where it does not apply, conv2d is F.conv2d exactly
    torch.testing.assert_close(conv2d(x, w, None, 2, 1), F.conv2d(x, w, None, 2, 1), rtol=0, atol=0)


def test_resnet50_features_with_winograd_match_the_direct_convolutions(monkeypatch):
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet50", frozen=("stem",)), return_layers=("layer2", "layer3"))
    images = torch.randn(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    calls = []
    apply = _Winograd.apply
    monkeypatch.setattr(_Winograd, "apply", lambda *args: calls.append(args[0].shape) or apply(*args))
    fast = [f for f, _ in backbone(images, mask)]
    # the stride-1 3x3 convolutions of layer1 (64 ch), layer2 (128) and layer3 (256)
    assert len(calls) == 3 + 3 + 5
    monkeypatch.setattr(winograd, "applies", lambda *args: False)
    direct = [f for f, _ in backbone(images, mask)]
    for a, b in zip(fast, direct):
        assert relative_error(a, b.double()) < 1e-4
