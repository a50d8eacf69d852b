"""Fused CPU kernel for multi-scale deformable attention, compiled on first use (see
:mod:`detrkit.ops.cpu_build`). If it cannot be built, :func:`ms_deform_attn_cpu` returns None
so that the caller falls back to the reference.
"""
import ctypes
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_build import CompiledLibrary, num_threads, ptr

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <vector>

// Shapes: value (B, S, M, D); loc (B, Q, M, L, P, 2); attn (B, Q, M, L, P); out (B, Q, M, D).
// A sample at pixel (x, y) = (loc_x * W - 0.5, loc_y * H - 0.5) reads corners
// (x0 + i, y0 + j), i, j in {0, 1}, with weights (i ? fx : 1 - fx) * (j ? fy : 1 - fy).

template <typename T>
struct Sample {
    int64_t row[4];  // token index of each corner in value, -1 when outside the map
    T w[4];          // bilinear weight of each corner and its derivatives in x and y
    T dwdx[4], dwdy[4];
};

template <typename T>
static inline bool make_sample(T lx, T ly, int64_t H, int64_t W, int64_t start, Sample<T>& s) {
    const T x = lx * W - T(0.5), y = ly * H - T(0.5);
    // Also rejects NaN and coordinates too large to convert to an integer.
    if (!(x >= -1 && x <= W && y >= -1 && y <= H)) return false;
    const T x0f = std::floor(x), y0f = std::floor(y);
    const T fx = x - x0f, fy = y - y0f;
    const int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;
    const T wx[2] = {1 - fx, fx}, wy[2] = {1 - fy, fy}, sign[2] = {-1, 1};
    for (int c = 0; c < 4; ++c) {
        const int i = c & 1, j = c >> 1;
        const int64_t xi = x0 + i, yj = y0 + j;
        s.row[c] = (xi >= 0 && xi < W && yj >= 0 && yj < H) ? start + yj * W + xi : -1;
        s.w[c] = wx[i] * wy[j];
        s.dwdx[c] = sign[i] * wy[j];
        s.dwdy[c] = wx[i] * sign[j];
    }
    return true;
}

static inline void prefetch(const void* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char*)p + i);
}

// DC is the head dim when fixed at compile time (the D-loops then live in registers), else 0.
template <typename T, int DC>
static void forward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                    const T* attn, T* out, int64_t B, int64_t S, int64_t M, int64_t D_,
                    int64_t Q, int64_t L, int64_t P, int nthreads) {
    const int64_t D = DC > 0 ? DC : D_;
    #pragma omp parallel num_threads(nthreads)
    {
        T fixed[DC > 0 ? DC : 1];
        std::vector<T> dynamic(DC > 0 ? 0 : D);
        T* acc = DC > 0 ? fixed : dynamic.data();
        #pragma omp for schedule(static)
        for (int64_t bq = 0; bq < B * Q; ++bq) {
            const T* value_b = value + (bq / Q) * S * M * D;
            for (int64_t m = 0; m < M; ++m) {
                const int64_t bqm = bq * M + m;
                for (int64_t d = 0; d < D; ++d) acc[d] = 0;
                for (int64_t l = 0; l < L; ++l) {
                    for (int64_t p = 0; p < P; ++p) {
                        const int64_t k = (bqm * L + l) * P + p;
                        Sample<T> s;
                        if (!make_sample(loc[2 * k], loc[2 * k + 1], shapes[2 * l],
                                         shapes[2 * l + 1], starts[l], s)) continue;
                        for (int c = 0; c < 4; ++c) {
                            if (s.row[c] < 0) continue;
                            const T* v = value_b + (s.row[c] * M + m) * D;
                            const T w = s.w[c] * attn[k];
                            for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
                        }
                    }
                }
                T* o = out + bqm * D;
                for (int64_t d = 0; d < D; ++d) o[d] = acc[d];
            }
        }
    }
}

// One task per (batch, head): tasks write disjoint slices of grad_value, so no atomics.
template <typename T, int DC>
static void backward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                     const T* attn, const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn,
                     int64_t B, int64_t S, int64_t M, int64_t D_, int64_t Q, int64_t L,
                     int64_t P, int nthreads) {
    const int64_t D = DC > 0 ? DC : D_;
    const int64_t ahead = 4;  // queries; their rows are M apart, beyond the hardware prefetcher
    #pragma omp parallel num_threads(nthreads)
    {
        T fixed[DC > 0 ? DC : 1];
        std::vector<T> dynamic(DC > 0 ? 0 : D);
        T* g = DC > 0 ? fixed : dynamic.data();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t bm = 0; bm < B * M; ++bm) {
            const int64_t b = bm / M, m = bm % M;
            const T* value_b = value + b * S * M * D;
            T* grad_value_b = grad_value + b * S * M * D;
            for (int64_t q = 0; q < Q; ++q) {
                const int64_t bqm = (b * Q + q) * M + m;
                if (q + ahead < Q) {
                    const int64_t next = bqm + ahead * M;
                    prefetch(loc + next * L * P * 2, L * P * 2 * sizeof(T));
                    prefetch(attn + next * L * P, L * P * sizeof(T));
                    prefetch(grad_out + next * D, D * sizeof(T));
                }
                for (int64_t d = 0; d < D; ++d) g[d] = grad_out[bqm * D + d];
                for (int64_t l = 0; l < L; ++l) {
                    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
                    for (int64_t p = 0; p < P; ++p) {
                        const int64_t k = (bqm * L + l) * P + p;
                        Sample<T> s;
                        T ga = 0, gx = 0, gy = 0;
                        if (make_sample(loc[2 * k], loc[2 * k + 1], H, W, starts[l], s)) {
                            const T a = attn[k];
                            for (int c = 0; c < 4; ++c) {
                                if (s.row[c] < 0) continue;
                                const T* v = value_b + (s.row[c] * M + m) * D;
                                T* gv = grad_value_b + (s.row[c] * M + m) * D;
                                const T aw = a * s.w[c];
                                T dot = 0;
                                #pragma omp simd reduction(+:dot)
                                for (int64_t d = 0; d < D; ++d) {
                                    dot += g[d] * v[d];
                                    gv[d] += aw * g[d];
                                }
                                ga += s.w[c] * dot;
                                gx += s.dwdx[c] * dot;
                                gy += s.dwdy[c] * dot;
                            }
                            gx *= a * W;
                            gy *= a * H;
                        }
                        grad_attn[k] = ga;
                        grad_loc[2 * k] = gx;
                        grad_loc[2 * k + 1] = gy;
                    }
                }
            }
        }
    }
}

#define DISPATCH_D(KERNEL, T, D, ...)                   \
    switch (D) {                                        \
        case 32: KERNEL<T, 32>(__VA_ARGS__); break;     \
        case 64: KERNEL<T, 64>(__VA_ARGS__); break;     \
        default: KERNEL<T, 0>(__VA_ARGS__);             \
    }

#define DEFINE(T, NAME)                                                                          \
extern "C" void msda_forward_##NAME(const T* value, const int64_t* shapes, const int64_t* starts, \
        const T* loc, const T* attn, T* out, int64_t B, int64_t S, int64_t M, int64_t D,          \
        int64_t Q, int64_t L, int64_t P, int nthreads) {                                          \
    DISPATCH_D(forward, T, D, value, shapes, starts, loc, attn, out, B, S, M, D, Q, L, P,         \
               nthreads)                                                                          \
}                                                                                                \
extern "C" void msda_backward_##NAME(const T* value, const int64_t* shapes,                      \
        const int64_t* starts, const T* loc, const T* attn, const T* grad_out, T* grad_value,    \
        T* grad_loc, T* grad_attn, int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q,        \
        int64_t L, int64_t P, int nthreads) {                                                    \
    DISPATCH_D(backward, T, D, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,  \
               grad_attn, B, S, M, D, Q, L, P, nthreads)                                          \
}
DEFINE(float, f32)
DEFINE(double, f64)
"""

def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr_t = ctypes.c_int64, ctypes.c_void_p
    for name in ("f32", "f64"):
        getattr(lib, f"msda_forward_{name}").argtypes = [ptr_t] * 6 + [i64] * 7 + [ctypes.c_int]
        getattr(lib, f"msda_backward_{name}").argtypes = [ptr_t] * 9 + [i64] * 7 + [ctypes.c_int]


KERNEL = CompiledLibrary("msda", _SOURCE, _declare, "the slower grid_sample reference")
load = KERNEL.load


def _num_threads(loc: Tensor) -> int:
    return num_threads(loc[..., 0].numel(), 16384)  # about 0.3 ms of work per thread at least


class _MSDeformAttnCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        ends = level_start_index + spatial_shapes.prod(1)
        if (spatial_shapes < 1).any() or (level_start_index < 0).any() or (ends > S).any():
            raise ValueError(f"ms_deform_attn: levels {spatial_shapes.tolist()} starting at "
                             f"{level_start_index.tolist()} do not fit in {S} value tokens")
        tensors = (value.contiguous(), spatial_shapes.to(torch.int64).contiguous(),
                   level_start_index.to(torch.int64).contiguous(),
                   sampling_locations.contiguous(), attention_weights.contiguous())
        out = value.new_empty(B, Q, M, D)
        kernel = getattr(KERNEL.load(), f"msda_forward_{_suffix(value.dtype)}")
        kernel(*map(ptr, tensors), ptr(out), B, S, M, D, Q, L, P, _num_threads(tensors[3]))
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
        kernel = getattr(KERNEL.load(), f"msda_backward_{_suffix(value.dtype)}")
        kernel(*map(ptr, (value, shapes, starts, loc, attn, grad_out.contiguous(), grad_value,
                           grad_loc, grad_attn)),
               B, S, M, D, Q, L, P, _num_threads(loc))
        return grad_value, None, None, grad_loc, grad_attn


def _suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


def ms_deform_attn_cpu(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> Optional[Tensor]:
    """Compiled-kernel path; float32 or float64 CPU tensors of one dtype, shapes as in
    :func:`detrkit.ops.ms_deform_attn`. Returns (B, Q, M * D), or None without a kernel."""
    if load() is None:
        return None
    return _MSDeformAttnCPU.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)
