"""ms_deform_attn: every implementation against a float64 evaluation of the formula."""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from detrkit.ops import cpu_build, ms_deform_attn
from detrkit.ops import ms_deform_attn_cpu

# The function detrkit.ops.ms_deform_attn hides the submodule of the same name.
msda_module = importlib.import_module("detrkit.ops.ms_deform_attn")

SHAPES = ((5, 7), (3, 4), (1, 2))


def formula(value, spatial_shapes, level_start_index, loc, attn):
    """Four explicit bilinear corners per sample in float64; corners off the map count zero."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    b = torch.arange(B).view(B, 1, 1, 1)
    m = torch.arange(M).view(1, 1, M, 1)
    out = value.new_zeros(B, Q, M, D)
    for l, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        x = loc[:, :, :, l, :, 0] * W - 0.5  # (B, Q, M, P) pixel coordinates
        y = loc[:, :, :, l, :, 1] * H - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            token = start + (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long()
            corner = value[b, token, m]  # (B, Q, M, P, D)
            out = out + ((attn[:, :, :, l] * weight * inside)[..., None] * corner).sum(3)
    return out.reshape(B, Q, M * D)


def level_index(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def random_inputs(B=2, Q=9, M=2, D=6, shapes=SHAPES, P=3, seed=0):
    """float64 inputs with sampling points inside, exactly on the border and outside the maps."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_index(shapes)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    # Built (B, M, S, D) and transposed: the ops must accept non-contiguous inputs.
    value = torch.randn(B, M, S, D, generator=g, dtype=torch.float64).transpose(1, 2)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    pick = torch.rand(loc.shape, generator=g)
    edge = torch.rand(loc.shape, generator=g, dtype=torch.float64).round()  # exactly 0 or 1
    loc = torch.where(pick < 0.1, edge, loc)
    loc = torch.where(pick > 0.95, torch.full_like(loc, -4.0), loc)  # far outside
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    return value, spatial_shapes, level_start_index, loc, attn


def padded_inputs(M=2, D=6, P=3, seed=1):
    """A batch of two images, the second padded; padded tokens have zero values and the
    sampling points follow Deformable DETR: reference points in the valid area plus offsets."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_index(((8, 6), (4, 3), (2, 2)))
    S, L, B = int(spatial_shapes.prod(1).sum()), len(spatial_shapes), 2
    valid = torch.tensor([[1.0, 1.0], [0.5, 2 / 3]])  # (B, 2) valid fraction as (y, x)
    keep = []
    for H, W in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        keep.append((ys[None] < valid[:, :1, None] * H) & (xs[None] < valid[:, 1:, None] * W))
    keep = torch.cat([k.flatten(1) for k in keep], 1)  # (B, S)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64) * keep[:, :, None, None]
    Q = 10
    ref = torch.rand(B, Q, 2, generator=g, dtype=torch.float64) * valid.flip(1)[:, None]  # (x, y)
    offsets = torch.randn(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.5  # pixels
    loc = ref[:, :, None, None, None] + offsets / spatial_shapes.flip(1)[:, None]
    attn = torch.randn(B, Q, M, L * P, generator=g, dtype=torch.float64).softmax(-1)
    return value, spatial_shapes, level_start_index, loc, attn.view(B, Q, M, L, P)


def assert_matches_formula(inputs, impl, dtype, device="cpu"):
    if impl == "cpu":
        # Otherwise the op would silently test the reference it falls back to.
        if not cpu_build.has_compiler():
            pytest.skip("no C++ compiler")
        assert ms_deform_attn_cpu.load() is not None, "the CPU kernel failed to build"
    value, spatial_shapes, level_start_index, loc, attn = inputs
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], spatial_shapes.to(device), level_start_index.to(device),
                         leaves[1], leaves[2], impl=impl)
    expected_leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    expected = formula(expected_leaves[0], spatial_shapes, level_start_index, *expected_leaves[1:])
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, dtype))
    expected_grads = torch.autograd.grad(expected, expected_leaves, grad_out)
    assert out.dtype == dtype and out.shape == expected.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    names = ("output", "grad value", "grad sampling_locations", "grad attention_weights")
    for name, a, e in zip(names, (out, *grads), (expected, *expected_grads)):
        err = (a.detach().cpu().double() - e).abs().max().item()
        assert err <= tol * (1 + e.abs().max().item()), f"{impl} {dtype} {name}: error {err}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("D", [6, 32])
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_matches_formula(impl, D, dtype):
    assert_matches_formula(random_inputs(D=D), impl, dtype)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_padded_batch(impl):
    assert_matches_formula(padded_inputs(), impl, torch.float32)


def check_triton(device):
    assert_matches_formula(random_inputs(D=6), "triton", torch.float64, device)
    assert_matches_formula(padded_inputs(D=32), "triton", torch.float32, device)


def test_triton_matches_formula():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        check_triton("cuda")
        return
    # Without a GPU: Triton's interpreter, which must be enabled before triton is first
    # imported, hence a fresh process.
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           "import test_ms_deform_attn as t; t.check_triton('cpu')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cpu_gradcheck():
    value, spatial_shapes, level_start_index, loc, attn = random_inputs(B=1, Q=3, M=2, D=3, P=2)
    inputs = (value.requires_grad_(), spatial_shapes, level_start_index,
              loc.clamp(0.02, 0.98).requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: ms_deform_attn(*a, impl="cpu"), inputs)


def test_half_precision_is_computed_in_float32():
    value, spatial_shapes, level_start_index, loc, attn = random_inputs(D=32)
    out = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, loc.float(),
                         attn.float())
    assert out.dtype == torch.bfloat16
    expected = formula(value.bfloat16(), spatial_shapes, level_start_index, loc.float(),
                       attn.float())
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(msda_module.ENV_VAR, raising=False)
    assert msda_module.resolve_impl("auto", cpu) == "cpu"
    monkeypatch.setattr(msda_module, "triton_available", lambda: False)
    assert msda_module.resolve_impl("auto", cuda) == "reference"
    with pytest.raises(RuntimeError, match="triton"):
        msda_module.resolve_impl("triton", cuda)
    monkeypatch.setattr(msda_module, "triton_available", lambda: True)
    assert msda_module.resolve_impl("auto", cuda) == "triton"
    with pytest.raises(ValueError, match="CPU tensors"):
        msda_module.resolve_impl("cpu", cuda)
    with pytest.raises(ValueError, match="impl must be one of"):
        msda_module.resolve_impl("cuda", cpu)
    monkeypatch.setenv(msda_module.ENV_VAR, "reference")
    assert msda_module.resolve_impl("auto", cpu) == "reference"
    assert msda_module.resolve_impl("cpu", cpu) == "cpu"  # an explicit choice wins


def test_build_failure_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(ms_deform_attn_cpu.KERNEL, "_lib", None)
    monkeypatch.setattr(ms_deform_attn_cpu.KERNEL, "_failed", False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    inputs = random_inputs()
    with pytest.warns(RuntimeWarning, match="grid_sample reference"):
        out = ms_deform_attn(*inputs, impl="cpu")
    torch.testing.assert_close(out, formula(*inputs), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)


def test_inconsistent_inputs_raise():
    value, spatial_shapes, level_start_index, loc, attn = random_inputs()
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn[..., :-1])
    with pytest.raises(ValueError, match="do not fit"):  # would read past the end of value
        ms_deform_attn(value[:, :-1], spatial_shapes, level_start_index, loc, attn, impl="cpu")
