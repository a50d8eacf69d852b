"""Fused Triton kernels for multi-scale deformable attention (forward and backward).

Each program handles BLOCK_Q queries of one (batch, head) pair and the whole head dim D, so
the sampled values are reduced in registers and nothing of size (Q, L, P, D) is materialised.
The backward scatters into grad_value with atomic adds. Imported only when the "triton"
implementation is used; triton itself is optional.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

# Queries x head dims per program: with 4 warps, 8 elements per thread, which keeps the
# kernels clear of register spills on sm_90 (ptxas, float32, D = 32).
_TILE = 1024
_NUM_WARPS = 4


@triton.jit
def _sample(loc_ptr, attn_ptr, k, q_mask, H, W):
    """Pixel position of sample k as (x0, y0, fx, fy), its attention weight, and validity."""
    lx = tl.load(loc_ptr + 2 * k, mask=q_mask, other=0.0)
    ly = tl.load(loc_ptr + 2 * k + 1, mask=q_mask, other=0.0)
    a = tl.load(attn_ptr + k, mask=q_mask, other=0.0)
    x = lx * W - 0.5
    y = ly * H - 0.5
    # Same rule as the CPU kernel: beyond one pixel outside the map every corner is outside.
    valid = q_mask & (x >= -1) & (x <= W) & (y >= -1) & (y <= H)
    x = tl.where(valid, x, 0.0)  # keeps NaN and huge values away from the integer casts
    y = tl.where(valid, y, 0.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0, a, valid


@triton.jit
def _fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, S, M, Q,
                L: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    bm = tl.program_id(1)
    b = (bm // M).to(tl.int64)
    m = bm % M
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < Q
    d_mask = d < D
    bqm = (b * Q + q) * M + m
    value_b = value_ptr + b * S * M * D + m * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=value_ptr.dtype.element_ty)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * l + 1).to(tl.int32)
        start = tl.load(starts_ptr + l)
        for p in range(P):
            k = (bqm * L + l) * P + p
            x0, y0, fx, fy, a, valid = _sample(loc_ptr, attn_ptr, k, q_mask, H, W)
            for c in tl.static_range(4):
                xi = x0 + c % 2
                yj = y0 + c // 2
                w = (fx if c % 2 else 1 - fx) * (fy if c // 2 else 1 - fy)
                inside = valid & (xi >= 0) & (xi < W) & (yj >= 0) & (yj < H)
                row = start + yj * W + xi
                v = tl.load(value_b + row[:, None] * M * D + d[None, :],
                            mask=inside[:, None] & d_mask[None, :], other=0.0)
                acc += (w * a)[:, None] * v
    tl.store(out_ptr + bqm[:, None] * D + d[None, :], acc, mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                grad_value_ptr, grad_loc_ptr, grad_attn_ptr, S, M, Q,
                L: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    bm = tl.program_id(1)
    b = (bm // M).to(tl.int64)
    m = bm % M
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < Q
    d_mask = d < D
    bqm = (b * Q + q) * M + m
    value_b = value_ptr + b * S * M * D + m * D
    grad_value_b = grad_value_ptr + b * S * M * D + m * D
    g = tl.load(grad_out_ptr + bqm[:, None] * D + d[None, :],
                mask=q_mask[:, None] & d_mask[None, :], other=0.0)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * l + 1).to(tl.int32)
        start = tl.load(starts_ptr + l)
        for p in range(P):
            k = (bqm * L + l) * P + p
            x0, y0, fx, fy, a, valid = _sample(loc_ptr, attn_ptr, k, q_mask, H, W)
            grad_a = tl.zeros_like(fx)
            grad_x = tl.zeros_like(fx)
            grad_y = tl.zeros_like(fx)
            for c in tl.static_range(4):
                xi = x0 + c % 2
                yj = y0 + c // 2
                wx = fx if c % 2 else 1 - fx
                wy = fy if c // 2 else 1 - fy
                inside = valid & (xi >= 0) & (xi < W) & (yj >= 0) & (yj < H)
                mask = inside[:, None] & d_mask[None, :]
                offsets = (start + yj * W + xi)[:, None] * M * D + d[None, :]
                v = tl.load(value_b + offsets, mask=mask, other=0.0)
                dot = tl.sum(v * g, axis=1)
                grad_a += wx * wy * dot
                grad_x += (1 if c % 2 else -1) * wy * dot
                grad_y += (1 if c // 2 else -1) * wx * dot
                tl.atomic_add(grad_value_b + offsets, (a * wx * wy)[:, None] * g, mask=mask,
                              sem="relaxed")  # no ordering needed: only the sums are read
            tl.store(grad_attn_ptr + k, grad_a, mask=q_mask)
            tl.store(grad_loc_ptr + 2 * k, grad_x * a * W, mask=q_mask)
            tl.store(grad_loc_ptr + 2 * k + 1, grad_y * a * H, mask=q_mask)


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        tensors = (value.contiguous(), spatial_shapes.to(value.device, torch.int64).contiguous(),
                   level_start_index.to(value.device, torch.int64).contiguous(),
                   sampling_locations.contiguous(), attention_weights.contiguous())
        out = value.new_empty(B, Q, M, D)
        block_d = triton.next_power_of_2(D)
        block_q = max(1, _TILE // block_d)
        _fwd_kernel[(triton.cdiv(Q, block_q), B * M)](
            *tensors, out, S, M, Q, L, P, D, BLOCK_Q=block_q, BLOCK_D=block_d,
            num_warps=_NUM_WARPS)
        ctx.save_for_backward(*tensors)
        return out.view(B, Q, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = loc.shape
        grad_value = torch.zeros_like(value)
        grad_loc, grad_attn = torch.empty_like(loc), torch.empty_like(attn)
        block_d = triton.next_power_of_2(D)
        block_q = max(1, _TILE // block_d)
        _bwd_kernel[(triton.cdiv(Q, block_q), B * M)](
            value, shapes, starts, loc, attn, grad_out.contiguous(), grad_value, grad_loc,
            grad_attn, S, M, Q, L, P, D, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=_NUM_WARPS)
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Triton path; float32 or float64 tensors of one dtype on a CUDA device (or CPU under
    TRITON_INTERPRET=1), shapes as in :func:`detrkit.ops.ms_deform_attn`. Returns (B, Q, M * D)."""
    return _MSDeformAttnTriton.apply(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
