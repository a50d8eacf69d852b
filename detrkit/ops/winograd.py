"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) on CPU (Lavin & Gray, 2016).

A 6x6 input tile d and a 3x3 filter g give a 4x4 output tile Y = A^T [(G g G^T) * (B^T d B)] A,
the product taken elementwise in the 6x6 "Winograd domain". Summed over input channels, that
product is 36 matrix products (tiles x C_in) @ (C_in x C_out) with 36 multiplications per 16
outputs instead of 144: 4x fewer than a direct convolution. The convolutions of a ResNet already
run near this CPU's peak in oneDNN, so fewer multiplications is the only way to make them much
faster; measured on the 3x3 stride-1 convolutions of ResNet-50 at 512x512, forward + backward,
about 2x faster than oneDNN's direct convolution (bench/detr.py shows the whole training step).

The products run in ``torch.bmm`` (MKL); the tile transforms are C++ kernels compiled on first
use (:mod:`detrkit.ops.cpu_build`). Float32 rounding: about 6e-6 of the output's scale against
1e-6 for the direct convolution, from the transforms' coefficients up to 8.

:func:`conv2d` takes ``F.conv2d``'s arguments and uses Winograd where it applies (CPU, float32,
channels-last input, 3x3 kernel, stride 1, padding 1, no dilation or groups, no autocast, kernels
built), else ``F.conv2d``.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_build import CompiledLibrary, num_threads, ptr

_SOURCE = r"""
#include <algorithm>
#include <cstdint>

template <int R, int S> struct Mat { float v[R][S]; };

template <int R, int S>
constexpr Mat<S, R> transposed(const Mat<R, S>& m) {
    Mat<S, R> t{};
    for (int i = 0; i < R; ++i) for (int j = 0; j < S; ++j) t.v[j][i] = m.v[i][j];
    return t;
}

constexpr Mat<6, 6> BT = {{{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                           {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}}};
constexpr Mat<6, 3> G = {{{1.f / 4, 0, 0}, {-1.f / 6, -1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6, -1.f / 6},
                          {1.f / 24, 1.f / 12, 1.f / 6}, {1.f / 24, -1.f / 12, 1.f / 6}, {0, 0, 1}}};
constexpr Mat<4, 6> AT = {{{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}}};
constexpr Mat<6, 6> B = transposed(BT);
constexpr Mat<3, 6> GT = transposed(G);
constexpr Mat<6, 4> A = transposed(AT);

constexpr int CB = 16;  // channels per block: the vectorised axis of every transform
typedef float vec __attribute__((vector_size(CB * sizeof(float))));  // GCC/Clang vector extension

// Y = L X L^T for a block of CB channels; the loops unroll over the constant matrix.
template <int R, int S>
static inline void transform(const Mat<R, S>& L, const vec (&X)[S][S], vec (&Y)[R][R]) {
    vec T[R][S];
    #pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 6
        for (int j = 0; j < S; ++j) {
            vec acc = {};
            #pragma GCC unroll 6
            for (int i = 0; i < S; ++i) if (L.v[r][i] != 0) acc += L.v[r][i] * X[i][j];
            T[r][j] = acc;
        }
    #pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 6
        for (int q = 0; q < R; ++q) {
            vec acc = {};
            #pragma GCC unroll 6
            for (int j = 0; j < S; ++j) if (L.v[q][j] != 0) acc += L.v[q][j] * T[r][j];
            Y[r][q] = acc;
        }
}

// Layouts: images (Bn, H, W, C) channels-last; tile n = (b, t, u) of TH x TW per image covers
// output rows 4t .. 4t+3 and reads input rows 4t-1 .. 4t+4 (zero outside: padding 1), columns
// likewise; Winograd-domain tensors (36, N, C) with N = Bn * TH * TW.
struct Tiles {
    int64_t Bn, H, W, TH, TW, N;
    Tiles(int64_t Bn_, int64_t H_, int64_t W_)
        : Bn(Bn_), H(H_), W(W_), TH((H_ + 3) / 4), TW((W_ + 3) / 4), N(Bn_ * TH * TW) {}
    // pixel (b, h, w) of tile n's (row i, column j) at offset o (-1: input tile, 0: output tile);
    // -1 when outside the image
    inline int64_t pixel(int64_t n, int i, int j, int o) const {
        const int64_t b = n / (TH * TW), h = n / TW % TH * 4 + o + i, w = n % TW * 4 + o + j;
        return (h >= 0 && h < H && w >= 0 && w < W) ? (b * H + h) * W + w : -1;
    }
};

// cb < CB channels at the end of a row: the rest of the block is zero on load, dropped on store.
static inline vec load(const float* src, int cb) {
    vec v = {};
    if (cb == CB) __builtin_memcpy(&v, src, sizeof(vec));
    else for (int k = 0; k < cb; ++k) v[k] = src[k];
    return v;
}

static inline void store(const vec& v, int cb, float* dst) {
    if (cb == CB) __builtin_memcpy(dst, &v, sizeof(vec));
    else for (int k = 0; k < cb; ++k) dst[k] = v[k];
}

// The pixels of tile n (see Tiles::pixel), once per tile rather than once per channel block.
template <int R>
static inline void tile_pixels(const Tiles& t, int64_t n, int o, int64_t (&pix)[R][R]) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j) pix[i][j] = t.pixel(n, i, j, o);
}

// R x R blocks of CB channels from and to: an image (a tile's pixels, zero or skipped outside
// the image), or a Winograd-domain tensor (rows, N, C) at tile n.
template <int R>
static inline void read_tile(const float* img, const int64_t (&pix)[R][R], int64_t C, int64_t c0, int cb,
                             vec (&tile)[R][R]) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j) tile[i][j] = pix[i][j] < 0 ? vec{} : load(img + pix[i][j] * C + c0, cb);
}

// accumulate: img += tile (the adjoint of read_tile), else img = tile + bias
template <int R, bool accumulate>
static inline void write_tile(const vec (&tile)[R][R], const vec& bias, const int64_t (&pix)[R][R],
                              int64_t C, int64_t c0, int cb, float* img) {
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j) {
            if (pix[i][j] < 0) continue;
            float* dst = img + pix[i][j] * C + c0;
            store(accumulate ? load(dst, cb) + tile[i][j] : tile[i][j] + bias, cb, dst);
        }
}

template <int R>
static inline void read_domain(const float* buf, int64_t N, int64_t n, int64_t C, int64_t c0, int cb,
                               vec (&tile)[R][R]) {
    for (int k = 0; k < R * R; ++k) tile[k / R][k % R] = load(buf + (k * N + n) * C + c0, cb);
}

template <int R>
static inline void write_domain(const vec (&tile)[R][R], int64_t N, int64_t n, int64_t C, int64_t c0, int cb,
                                float* buf) {
    for (int k = 0; k < R * R; ++k) store(tile[k / R][k % R], cb, buf + (k * N + n) * C + c0);
}

static inline int block(int64_t C, int64_t c0) { return (int)std::min<int64_t>(CB, C - c0); }

// x (Bn, H, W, C) -> V (36, N, C), and the adjoint dV -> dx (zeroed by the caller). Tiles overlap
// by two rows or columns; those two apart do not, so the adjoint's four passes (row and column
// parity) never write a pixel from two threads at once.
extern "C" void winograd_input(const float* x, float* V, int64_t Bn, int64_t H, int64_t W, int64_t C,
                               int nthreads) {
    const Tiles t(Bn, H, W);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < t.N; ++n) {
        int64_t pix[6][6];
        tile_pixels(t, n, -1, pix);
        for (int64_t c0 = 0; c0 < C; c0 += CB) {
            vec d[6][6], v[6][6];
            read_tile(x, pix, C, c0, block(C, c0), d);
            transform(BT, d, v);
            write_domain(v, t.N, n, C, c0, block(C, c0), V);
        }
    }
}

extern "C" void winograd_input_backward(const float* dV, float* dx, int64_t Bn, int64_t H, int64_t W,
                                        int64_t C, int nthreads) {
    const Tiles t(Bn, H, W);
    for (int parity = 0; parity < 4; ++parity) {
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < t.N; ++n) {
            if ((n / t.TW % t.TH % 2) * 2 + n % t.TW % 2 != parity) continue;
            int64_t pix[6][6];
            tile_pixels(t, n, -1, pix);
            for (int64_t c0 = 0; c0 < C; c0 += CB) {
                vec v[6][6], d[6][6];
                read_domain(dV, t.N, n, C, c0, block(C, c0), v);
                transform(B, v, d);
                write_tile<6, true>(d, vec{}, pix, C, c0, block(C, c0), dx);
            }
        }
    }
}

// w (O, 3, 3, C) -> U (36, O, C), and the adjoint dU -> dw. Output channel o's filters w[o] read
// as a (9, 1, C) Winograd-domain-like tensor: its one tile, offset by o * 9 * C.
extern "C" void winograd_weight(const float* w, float* U, int64_t O, int64_t C, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c0 = 0; c0 < C; c0 += CB) {
            vec g[3][3], u[6][6];
            read_domain(w, 1, 0, C, c0 + o * 9 * C, block(C, c0), g);
            transform(G, g, u);
            write_domain(u, O, o, C, c0, block(C, c0), U);
        }
}

extern "C" void winograd_weight_backward(const float* dU, float* dw, int64_t O, int64_t C, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c0 = 0; c0 < C; c0 += CB) {
            vec u[6][6], g[3][3];
            read_domain(dU, O, o, C, c0, block(C, c0), u);
            transform(GT, u, g);
            write_domain(g, 1, 0, C, c0 + o * 9 * C, block(C, c0), dw);
        }
}

// M (36, N, O) -> y (Bn, H, W, O), plus bias (O,) when not null; and the adjoint dy -> dM.
extern "C" void winograd_output(const float* M, const float* bias, float* y, int64_t Bn, int64_t H,
                                int64_t W, int64_t O, int nthreads) {
    const Tiles t(Bn, H, W);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < t.N; ++n) {
        int64_t pix[4][4];
        tile_pixels(t, n, 0, pix);
        for (int64_t c0 = 0; c0 < O; c0 += CB) {
            vec m[6][6], out[4][4];
            read_domain(M, t.N, n, O, c0, block(O, c0), m);
            transform(AT, m, out);
            write_tile<4, false>(out, bias ? load(bias + c0, block(O, c0)) : vec{}, pix, O, c0, block(O, c0), y);
        }
    }
}

extern "C" void winograd_output_backward(const float* dy, float* dM, int64_t Bn, int64_t H, int64_t W,
                                         int64_t O, int nthreads) {
    const Tiles t(Bn, H, W);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < t.N; ++n) {
        int64_t pix[4][4];
        tile_pixels(t, n, 0, pix);
        for (int64_t c0 = 0; c0 < O; c0 += CB) {
            vec g[4][4], m[6][6];
            read_tile(dy, pix, O, c0, block(O, c0), g);
            transform(A, g, m);
            write_domain(m, t.N, n, O, c0, block(O, c0), dM);
        }
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("winograd_input", "winograd_input_backward"):
        getattr(lib, name).argtypes = [p, p, i64, i64, i64, i64, i32]
    lib.winograd_output.argtypes = [p, p, p, i64, i64, i64, i64, i32]
    lib.winograd_output_backward.argtypes = [p, p, i64, i64, i64, i64, i32]
    for name in ("winograd_weight", "winograd_weight_backward"):
        getattr(lib, name).argtypes = [p, p, i64, i64, i32]


KERNEL = CompiledLibrary("winograd", _SOURCE, _declare, "F.conv2d")
_PER_THREAD = 1 << 14  # elements


def _threads(t: Tensor) -> int:
    return num_threads(t.numel(), _PER_THREAD)


def _tiles(B: int, H: int, W: int) -> int:
    return B * ((H + 3) // 4) * ((W + 3) // 4)


def _channels_last(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


class _Winograd(torch.autograd.Function):
    """x (B, C, H, W) channels-last, weight (O, C, 3, 3), bias (O,) or None -> (B, O, H, W)
    channels-last; padding 1, stride 1."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        lib = KERNEL.load()
        B, C, H, W = x.shape
        O = weight.shape[0]
        x = x.permute(0, 2, 3, 1).contiguous()  # a view when x is channels-last
        w = weight.permute(0, 2, 3, 1).contiguous()  # (O, 3, 3, C)
        N = _tiles(B, H, W)
        V, U = x.new_empty(36, N, C), x.new_empty(36, O, C)
        lib.winograd_input(ptr(x), ptr(V), B, H, W, C, _threads(V))
        lib.winograd_weight(ptr(w), ptr(U), O, C, _threads(U))
        M = torch.bmm(V, U.transpose(1, 2))  # (36, N, O)
        y = _channels_last(B, O, H, W, like=x)
        b = bias.contiguous() if bias is not None else None
        lib.winograd_output(ptr(M), ptr(b) if b is not None else None, ptr(y), B, H, W, O, _threads(M))
        ctx.save_for_backward(V, U)
        ctx.geometry = (B, C, H, W, O)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        lib = KERNEL.load()
        V, U = ctx.saved_tensors
        B, C, H, W, O = ctx.geometry
        grad = grad.permute(0, 2, 3, 1).contiguous()  # (B, H, W, O)
        dM = grad.new_empty(36, V.shape[1], O)
        lib.winograd_output_backward(ptr(grad), ptr(dM), B, H, W, O, _threads(dM))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dV = torch.bmm(dM, U)  # (36, N, C)
            grad_x = _channels_last(B, C, H, W, like=grad).zero_()
            lib.winograd_input_backward(ptr(dV), ptr(grad_x), B, H, W, C, _threads(dV))
        if ctx.needs_input_grad[1]:
            dU = torch.bmm(dM.transpose(1, 2), V)  # (36, O, C)
            grad_w = _channels_last(O, C, 3, 3, like=grad)
            lib.winograd_weight_backward(ptr(dU), ptr(grad_w), O, C, _threads(dU))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1, 2))
        return grad_x, grad_w, grad_b


# Where Winograd was slower here (batch 2 at 512x512, forward / forward + backward, ms): layer4's
# 512x512 filters, whose Winograd-domain copy (38 MB) costs more to write than the products save
# on 16x16 maps (direct 11.3 / 36.1, Winograd 20.9 / 46.8); and the forward alone of layer1's 64
# channels (10.9 direct, 15.7 Winograd: its (2048 x 64) @ (64 x 64) products run far below peak),
# whose backward gains more than that (forward + backward 38.4 direct, 29.1 Winograd). So 64-channel
# convolutions take Winograd only when they are trained. In a whole step of a ResNet-18 trained
# whole (detr_small, medians of 16 steps alternating in one process, three runs): 0.593 s instead
# of 0.618, 0.595 instead of 0.591, 0.632 instead of 0.669.
MAX_FILTERS = 256 * 256
MIN_CHANNELS = 128
MIN_CHANNELS_TRAINED = 64


def applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups) -> bool:
    """Whether :func:`conv2d` takes the Winograd path for these arguments."""
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation)]
    trained = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and weight.shape[2:] == (3, 3) and weight.shape[0] * weight.shape[1] <= MAX_FILTERS
            and min(weight.shape[:2]) >= (MIN_CHANNELS_TRAINED if trained else MIN_CHANNELS)
            and pairs == [(1, 1), (1, 1), (1, 1)] and groups == 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu") and KERNEL.load() is not None)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, by Winograd F(4x4, 3x3)
    where :func:`applies` (the output is then channels-last, as oneDNN's would be)."""
    if applies(x, weight, stride, padding, dilation, groups):
        return _Winograd.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
