"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) on CPU (Lavin & Gray, 2016).

A 6x6 input tile d and a 3x3 filter g give a 4x4 output tile Y = A^T [(G g G^T) * (B^T d B)] A,
the product taken elementwise in the 6x6 "Winograd domain". Summed over input channels, that
product is 36 matrix products (tiles x C_in) @ (C_in x C_out) with 36 multiplications per 16
outputs instead of 144: 4x fewer than a direct convolution. The convolutions of a ResNet already
run near this CPU's peak in oneDNN, so fewer multiplications is the only way to make them much
faster; measured on the 3x3 stride-1 convolutions of ResNet-50 at 512x512, forward + backward,
about 2x faster than oneDNN's direct convolution (bench/detr.py shows the whole training step).

The products run in ``torch.bmm`` (MKL), or, for up to 128 channels, inside a fused C++ kernel
that keeps the Winograd-domain tiles in cache; the tile transforms are C++ kernels compiled on first
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

// All three steps in one pass, for few channels (C, O <= 128, multiples of 16): there the
// products are small and writing and reading the (36, N, C) and (36, N, O) tensors costs more
// than they do. Each thread takes blocks of TB tiles: input transform into Vb (36, TB, C),
// products with Ut (36, C, O) into Mb (36, TB, OB) for OB output channels at a time (all in
// cache), output transform into y.
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
constexpr int TB = 12, RB = 6, OB = 64;

// c[r][0..16] (+)= sum_k a[r, k] * b[k][0..16] for R <= RB rows r, a[r, k] at a + r * a_r + k * a_k
// (row strides ldb, ldc): 2R accumulators in registers, the usual shape of a matrix-product
// kernel for 16 AVX2 registers. The forward products read a by rows, the weight gradient's by columns.
template <int R, bool accumulate>
static inline void micro(const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb, int64_t K,
                         float* c, int64_t ldc) {
    vec8 s[R][2] = {};
    if (accumulate)
        for (int r = 0; r < R; ++r) {
            __builtin_memcpy(&s[r][0], c + r * ldc, sizeof(vec8));
            __builtin_memcpy(&s[r][1], c + r * ldc + 8, sizeof(vec8));
        }
    for (int64_t k = 0; k < K; ++k) {
        vec8 b0, b1;
        __builtin_memcpy(&b0, b + k * ldb, sizeof(vec8));
        __builtin_memcpy(&b1, b + k * ldb + 8, sizeof(vec8));
        #pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const float v = a[r * a_r + k * a_k];
            s[r][0] += v * b0;
            s[r][1] += v * b1;
        }
    }
    for (int r = 0; r < R; ++r) {
        __builtin_memcpy(c + r * ldc, &s[r][0], sizeof(vec8));
        __builtin_memcpy(c + r * ldc + 8, &s[r][1], sizeof(vec8));
    }
}

extern "C" void winograd_fused(const float* x, const float* Ut, const float* bias, float* y, int64_t Bn,
                               int64_t H, int64_t W, int64_t C, int64_t O, int nthreads) {
    const Tiles t(Bn, H, W);
    const int64_t blocks = (t.N + TB - 1) / TB;
    #pragma omp parallel num_threads(nthreads)
    {
        float* Vb = new float[36 * TB * C]();  // rows past a partial block: finite, never read uninitialised
        float* Mb = new float[36 * TB * OB];
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t n0 = blk * TB, nt = std::min<int64_t>(TB, t.N - n0);
            for (int64_t k = 0; k < nt; ++k) {
                int64_t pix[6][6];
                tile_pixels(t, n0 + k, -1, pix);
                for (int64_t c0 = 0; c0 < C; c0 += CB) {
                    vec d[6][6], v[6][6];
                    read_tile(x, pix, C, c0, block(C, c0), d);
                    transform(BT, d, v);
                    write_domain(v, TB, k, C, c0, block(C, c0), Vb);
                }
            }
            for (int64_t o0 = 0; o0 < O; o0 += OB) {
                const int64_t ob = std::min<int64_t>(OB, O - o0);
                for (int e = 0; e < 36; ++e)
                    for (int64_t r0 = 0; r0 < TB; r0 += RB)
                        for (int64_t o = 0; o < ob; o += 16)
                            micro<RB, false>(Vb + (e * TB + r0) * C, C, 1, Ut + e * C * O + o0 + o, O, C,
                                             Mb + (e * TB + r0) * OB + o, OB);
                for (int64_t k = 0; k < nt; ++k) {
                    int64_t pix[4][4];
                    tile_pixels(t, n0 + k, 0, pix);
                    for (int64_t c0 = 0; c0 < ob; c0 += CB) {
                        vec m[6][6], out[4][4];
                        read_domain(Mb, TB, k, OB, c0, CB, m);
                        transform(AT, m, out);
                        write_tile<4, false>(out, bias ? load(bias + o0 + c0, CB) : vec{}, pix, O, o0 + c0,
                                             CB, y);
                    }
                }
            }
        }
        delete[] Vb;
        delete[] Mb;
    }
}

// The weight gradient in one pass: dU (36, O, C) = sum over tiles n of dM[:, n]^T V[:, n], with
// dM the adjoint output transform of dy and V the input transform of x, TBW tiles at a time in
// cache; each thread sums into its own dU, added into the caller's (zeroed) one at the end.
constexpr int TBW = 48;

// acc[r][0..16] += sum_k a[k][r] * b[k][0..16] for `rows` <= RB rows (row strides lda, ldb, ldacc)
static void accumulate_rows(int rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                            float* acc, int64_t ldacc) {
    switch (rows) {
        case 6: return micro<6, true>(a, 1, lda, b, ldb, K, acc, ldacc);
        case 5: return micro<5, true>(a, 1, lda, b, ldb, K, acc, ldacc);
        case 4: return micro<4, true>(a, 1, lda, b, ldb, K, acc, ldacc);
        case 3: return micro<3, true>(a, 1, lda, b, ldb, K, acc, ldacc);
        case 2: return micro<2, true>(a, 1, lda, b, ldb, K, acc, ldacc);
        default: return micro<1, true>(a, 1, lda, b, ldb, K, acc, ldacc);
    }
}

extern "C" void winograd_fused_weight_grad(const float* x, const float* dy, float* dU, int64_t Bn, int64_t H,
                                           int64_t W, int64_t C, int64_t O, int nthreads) {
    const Tiles t(Bn, H, W);
    const int64_t blocks = (t.N + TBW - 1) / TBW;
    #pragma omp parallel num_threads(nthreads)
    {
        float* Vb = new float[36 * TBW * C];
        float* Mb = new float[36 * TBW * O];
        float* acc = new float[36 * O * C]();
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t n0 = blk * TBW, nt = std::min<int64_t>(TBW, t.N - n0);
            for (int64_t k = 0; k < nt; ++k) {
                int64_t pin[6][6], pout[4][4];
                tile_pixels(t, n0 + k, -1, pin);
                tile_pixels(t, n0 + k, 0, pout);
                for (int64_t c0 = 0; c0 < C; c0 += CB) {
                    vec d[6][6], v[6][6];
                    read_tile(x, pin, C, c0, CB, d);
                    transform(BT, d, v);
                    write_domain(v, TBW, k, C, c0, CB, Vb);
                }
                for (int64_t o0 = 0; o0 < O; o0 += CB) {
                    vec g[4][4], m[6][6];
                    read_tile(dy, pout, O, o0, CB, g);
                    transform(A, g, m);
                    write_domain(m, TBW, k, O, o0, CB, Mb);
                }
            }
            for (int e = 0; e < 36; ++e)
                for (int64_t r0 = 0; r0 < O; r0 += RB)
                    for (int64_t c = 0; c < C; c += 16)
                        accumulate_rows((int)std::min<int64_t>(RB, O - r0), Mb + e * TBW * O + r0, O,
                                        Vb + e * TBW * C + c, C, nt, acc + (e * O + r0) * C + c, C);
        }
        #pragma omp critical
        for (int64_t i = 0; i < 36 * O * C; ++i) dU[i] += acc[i];
        delete[] Vb;
        delete[] Mb;
        delete[] acc;
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
    lib.winograd_fused.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i32]
    lib.winograd_fused_weight_grad.argtypes = [p, p, p, i64, i64, i64, i64, i64, i32]


KERNEL = CompiledLibrary("winograd", _SOURCE, _declare, "F.conv2d")
_PER_THREAD = 1 << 14  # elements


def _threads(t: Tensor) -> int:
    return num_threads(t.numel(), _PER_THREAD)


def _tiles(B: int, H: int, W: int) -> int:
    return B * ((H + 3) // 4) * ((W + 3) // 4)


def _channels_last(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def fuses(C: int, O: int) -> bool:
    """Whether a C -> O channel convolution takes the fused kernel (``winograd_fused``)."""
    return C % 16 == 0 and O % 16 == 0 and C * O <= MAX_FUSED_FILTERS


# The steps, each (B, C, H, W) tensor channels-last; N = _tiles(B, H, W).

def _input_domain(x: Tensor) -> Tensor:
    """x (B, C, H, W) -> V (36, N, C)."""
    B, C, H, W = x.shape
    x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): a view when x is channels-last
    V = x.new_empty(36, _tiles(B, H, W), C)
    KERNEL.load().winograd_input(ptr(x), ptr(V), B, H, W, C, _threads(V))
    return V


def _weight_domain(weight: Tensor) -> Tensor:
    """weight (O, C, 3, 3) -> U (36, O, C)."""
    O, C = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).contiguous()  # (O, 3, 3, C); ptr() needs it kept alive
    U = w.new_empty(36, O, C)
    KERNEL.load().winograd_weight(ptr(w), ptr(U), O, C, _threads(U))
    return U


def _output(M: Tensor, bias: Tensor | None, B: int, H: int, W: int) -> Tensor:
    """M (36, N, O) -> y (B, O, H, W), plus bias (O,)."""
    O = M.shape[2]
    y = _channels_last(B, O, H, W, like=M)
    b = bias.contiguous() if bias is not None else None
    KERNEL.load().winograd_output(ptr(M), ptr(b) if b is not None else None, ptr(y), B, H, W, O, _threads(M))
    return y


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """All three steps in one kernel: x (B, C, H, W) -> y (B, O, H, W)."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    x = x.permute(0, 2, 3, 1).contiguous()
    Ut = _weight_domain(weight).transpose(1, 2).contiguous()  # (36, C, O)
    y = _channels_last(B, O, H, W, like=x)
    b = bias.contiguous() if bias is not None else None
    KERNEL.load().winograd_fused(ptr(x), ptr(Ut), ptr(b) if b is not None else None, ptr(y), B, H, W, C, O,
                                 _threads(y))
    return y


def _output_domain_grad(grad: Tensor) -> Tensor:
    """The adjoint of :func:`_output`: dy (B, O, H, W) -> dM (36, N, O)."""
    B, O, H, W = grad.shape
    grad = grad.permute(0, 2, 3, 1).contiguous()
    dM = grad.new_empty(36, _tiles(B, H, W), O)
    KERNEL.load().winograd_output_backward(ptr(grad), ptr(dM), B, H, W, O, _threads(dM))
    return dM


def _fused_weight_domain_grad(x: Tensor, grad: Tensor) -> Tensor:
    """dU (36, O, C) from x (B, C, H, W) and dy (B, O, H, W) in one kernel, without dM and V."""
    B, C, H, W = x.shape
    O = grad.shape[1]
    x, grad = x.permute(0, 2, 3, 1).contiguous(), grad.permute(0, 2, 3, 1).contiguous()
    dU = x.new_zeros(36, O, C)
    KERNEL.load().winograd_fused_weight_grad(ptr(x), ptr(grad), ptr(dU), B, H, W, C, O, _threads(x))
    return dU


def _input_grad(dV: Tensor, B: int, H: int, W: int) -> Tensor:
    """The adjoint of :func:`_input_domain`: dV (36, N, C) -> dx (B, C, H, W)."""
    C = dV.shape[2]
    dx = _channels_last(B, C, H, W, like=dV).zero_()
    KERNEL.load().winograd_input_backward(ptr(dV), ptr(dx), B, H, W, C, _threads(dV))
    return dx


def _weight_grad(dU: Tensor) -> Tensor:
    """The adjoint of :func:`_weight_domain`: dU (36, O, C) -> dw (O, C, 3, 3)."""
    O, C = dU.shape[1:]
    dw = _channels_last(O, C, 3, 3, like=dU)
    KERNEL.load().winograd_weight_backward(ptr(dU), ptr(dw), O, C, _threads(dU))
    return dw


class _Winograd(torch.autograd.Function):
    """x (B, C, H, W) channels-last, weight (O, C, 3, 3), bias (O,) or None -> (B, O, H, W)
    channels-last; padding 1, stride 1."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        ctx.fused = fuses(C, weight.shape[0])
        if ctx.fused:
            ctx.save_for_backward(x, weight)
            return _fused(x, weight, bias)
        V, U = _input_domain(x), _weight_domain(weight)
        ctx.save_for_backward(V, U)
        return _output(torch.bmm(V, U.transpose(1, 2)), bias, B, H, W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        B, O, H, W = grad.shape
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if ctx.fused:
            x, weight = ctx.saved_tensors
            if need_x:  # a stride-1, padding-1 3x3 convolution's input gradient is the convolution
                # of the output gradient with its filters flipped, input and output channels swapped
                grad_x = _fused(grad.contiguous(memory_format=torch.channels_last),
                                weight.flip(2, 3).transpose(0, 1), None)
            if need_w and x.shape[1] * O <= MAX_FUSED_WEIGHT_GRAD_FILTERS:
                grad_w = _weight_grad(_fused_weight_domain_grad(x, grad))
            elif need_w:  # the Winograd-domain input is recomputed here rather than kept since the forward
                grad_w = _weight_grad(torch.bmm(_output_domain_grad(grad).transpose(1, 2), _input_domain(x)))
        else:
            V, U = ctx.saved_tensors
            dM = _output_domain_grad(grad)
            if need_x:
                grad_x = _input_grad(torch.bmm(dM, U), B, H, W)
            if need_w:
                grad_w = _weight_grad(torch.bmm(dM.transpose(1, 2), V))
        if need_b:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


# Measured here, batch 2 at 512x512 (ms). Layer4's 512x512 filters stay direct: their
# Winograd-domain copy (38 MB) costs more to write than the products save on 16x16 maps (forward /
# forward + backward: direct 11.3 / 36.1, Winograd 20.9 / 46.8). Up to 128x128 filters the fused
# kernel: layer1's 64 channels, forward 7.8 against 11.3 direct and 11.4 unfused, where the
# (2048 x 64) @ (64 x 64) products run far below peak in bmm and the Winograd-domain tensors cost
# more memory traffic than the products; layer2's 128, 5.7-7.4 against 8.1-8.9 unfused. At 256
# channels the fused kernel reads all of Ut (9.4 MB) per block of tiles and is slower (10.6 against
# 8.0). The fused weight gradient, which keeps a (36, O, C) sum per thread, only up to 64x64
# filters: 9.3 against 25.0 ms at 64 channels, 7.3 against 6.2 at 128. A detr_small training step
# (ResNet-18 trained whole; medians of 20 alternating in one process, two runs): 0.661 and 0.602 s
# with the fused kernels, against 0.687 and 0.658 before; inference 0.114 against 0.128.
MAX_FILTERS = 256 * 256
MAX_FUSED_FILTERS = 128 * 128
MAX_FUSED_WEIGHT_GRAD_FILTERS = 64 * 64
MIN_CHANNELS = 64


def applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups) -> bool:
    """Whether :func:`conv2d` takes the Winograd path for these arguments."""
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation)]
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and weight.shape[2:] == (3, 3) and weight.shape[0] * weight.shape[1] <= MAX_FILTERS
            and min(weight.shape[:2]) >= MIN_CHANNELS
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
