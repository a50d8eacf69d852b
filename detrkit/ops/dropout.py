"""Dropout for CPU training in one pass over memory.

``torch.nn.functional.dropout`` on CPU draws a Bernoulli mask with a Mersenne Twister (one call
per element), then multiplies: several passes over a (B, S, d_ffn) tensor. It took about 10% of a
Deformable-DETR-R50 training step here. This kernel hashes (seed, element index) into the
keep/drop decision and writes the output and a byte mask in the same pass; the backward is one
more pass. The seed comes from torch's generator, so ``torch.manual_seed`` and saved RNG states
reproduce the masks. Elsewhere (CUDA, other dtypes, no compiler) it is torch's dropout.
"""
import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .cpu_build import CompiledLibrary, num_threads, ptr

_SOURCE = r"""
#include <cstdint>

// A 32-bit integer hash with good avalanche (C. Wellons' "lowbias32"); two rounds over the
// element index mixed with the seed make neighbouring elements' decisions independent.
static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

// keep[i] = hash(seed, i) >= threshold, so P(drop) = threshold / 2^32. 32-bit indices within
// chunks of 2^30 elements (each chunk its own seed), and no branches, so that the loop vectorises.
template <typename T>
static void forward(const T* x, T* out, uint8_t* keep, int64_t n, uint32_t seed0, uint32_t seed1,
                    uint32_t threshold, T scale, int nthreads) {
    const int64_t chunk = int64_t(1) << 30;
    for (int64_t start = 0; start < n; start += chunk) {
        const uint32_t s0 = seed0 ^ mix(uint32_t(start >> 30) + seed1);
        const int64_t m = n - start < chunk ? n - start : chunk;
        #pragma omp parallel num_threads(nthreads)
        {
            // private copies and restrict: byte stores may alias anything, and shared values
            // reloaded after every store stop vectorisation
            const T* __restrict xs = x + start;
            T* __restrict outs = out + start;
            uint8_t* __restrict keeps = keep + start;
            const uint32_t a = s0, b = seed1, t = threshold;
            const T sc = scale;
            #pragma omp for simd schedule(static)
            for (int64_t i = 0; i < m; ++i) {
                const int32_t k = mix(mix(uint32_t(i) ^ a) + b) >= t;  // signed: AVX2 converts only those
                keeps[i] = (uint8_t)k;
                outs[i] = xs[i] * (T(k) * sc);
            }
        }
    }
}

template <typename T>
static void backward(const T* grad, const uint8_t* keep, T* out, int64_t n, T scale, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        const T* __restrict g = grad;
        const uint8_t* __restrict k = keep;
        T* __restrict o = out;
        const T sc = scale;
        #pragma omp for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) o[i] = g[i] * (T(k[i]) * sc);
    }
}

#define DEFINE(T, NAME)                                                                          \
extern "C" void dropout_forward_##NAME(const T* x, T* out, uint8_t* keep, int64_t n,           \
        uint32_t seed0, uint32_t seed1, uint32_t threshold, T scale, int nthreads) {            \
    forward<T>(x, out, keep, n, seed0, seed1, threshold, scale, nthreads);                      \
}                                                                                                \
extern "C" void dropout_backward_##NAME(const T* grad, const uint8_t* keep, T* out, int64_t n,  \
        T scale, int nthreads) {                                                                 \
    backward<T>(grad, keep, out, n, scale, nthreads);                                           \
}
DEFINE(float, f32)
DEFINE(double, f64)
"""

_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32
    for name, scalar in _TYPES.values():
        getattr(lib, f"dropout_forward_{name}").argtypes = [p, p, p, i64, u32, u32, u32, scalar, ctypes.c_int]
        getattr(lib, f"dropout_backward_{name}").argtypes = [p, p, p, i64, scalar, ctypes.c_int]


KERNEL = CompiledLibrary("dropout", _SOURCE, _declare, "torch's dropout")
_PER_THREAD = 1 << 16  # elements


class _DropoutCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        name, scalar = _TYPES[x.dtype]
        x = x.contiguous()
        out, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
        seed0, seed1 = torch.randint(0, 2 ** 32, (2,), dtype=torch.int64).tolist()
        threshold = min(round(p * 2 ** 32), 2 ** 32 - 1)
        ctx.scale = 1.0 / (1.0 - p)
        getattr(KERNEL.load(), f"dropout_forward_{name}")(
            ptr(x), ptr(out), ptr(keep), x.numel(), seed0, seed1, threshold, scalar(ctx.scale),
            num_threads(x.numel(), _PER_THREAD))
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        keep, = ctx.saved_tensors
        name, scalar = _TYPES[grad.dtype]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        getattr(KERNEL.load(), f"dropout_backward_{name}")(
            ptr(grad), ptr(keep), ptr(out), grad.numel(), scalar(ctx.scale), num_threads(grad.numel(), _PER_THREAD))
        return out, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``; float32/float64 CPU tensors use the one-pass kernel."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0 or x.device.type != "cpu" or x.dtype not in _TYPES or KERNEL.load() is None:
        return F.dropout(x, p, training)
    return _DropoutCPU.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
