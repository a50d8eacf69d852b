"""Benchmark of ms_deform_attn: every available path at Deformable DETR's shapes.

    python bench/msda.py [--device cpu|cuda] [--repeat N]

Shapes: a 512x512 image (levels 64², 32², 16², 8²), batch 2, 8 heads of 32, 4 levels x 4
points; the encoder (Q = S = 5440) and the decoder (Q = 300). Sampling points are reference
points plus offsets of a few pixels, as in a trained model. Paths are timed interleaved, best
of N, so that their ratios to the reference come from the same conditions. The floor is the
time to read the inputs and write the outputs once at the measured copy bandwidth.
"""
import argparse
import os
import time

import torch

from detrkit.ops import ms_deform_attn
from detrkit.ops.ms_deform_attn import triton_available
from detrkit.ops.ms_deform_attn_cpu import load as load_cpu_kernel

LEVELS = ((64, 64), (32, 32), (16, 16), (8, 8))
B, M, D, P = 2, 8, 32, 4


def make_inputs(num_queries: int | None, device: str, seed: int = 0):
    """num_queries=None: encoder (one query per token, at its own position); else decoder."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(LEVELS)
    if num_queries is None:
        centres = [torch.stack(torch.meshgrid((torch.arange(W) + 0.5) / W,
                                              (torch.arange(H) + 0.5) / H, indexing="xy"), -1)
                   for H, W in LEVELS]  # (H, W, 2) as (x, y)
        ref = torch.cat([c.reshape(-1, 2) for c in centres])[None].expand(B, -1, -1)
    else:
        ref = torch.rand(B, num_queries, 2, generator=g)
    Q = ref.shape[1]
    offsets = torch.randn(B, Q, M, L, P, 2, generator=g) * 2 / shapes.flip(1)[:, None]  # ~2 px
    loc = ref[:, :, None, None, None] + offsets
    attn = torch.randn(B, Q, M, L * P, generator=g).softmax(-1).view(B, Q, M, L, P)
    value = torch.randn(B, S, M, D, generator=g)
    return [t.to(device) for t in (value, shapes, starts, loc, attn)]


def copy_bandwidth(device: str, nbytes: int = 1 << 28, repeat: int = 10) -> float:
    """Bytes per second moved by a large copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeat))
    return 2 * nbytes / best


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def floor_bytes(inputs) -> tuple[int, int]:
    """Minimal traffic: forward reads value, locations, weights and writes the output; the
    backward reads them and the output gradient again and writes one gradient per input."""
    value, _, _, loc, attn = inputs
    ins = sum(t.numel() * t.element_size() for t in (value, loc, attn))
    out = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return ins + out, 3 * ins + 2 * out


def bench(name: str, inputs, impls: list[str], device: str, repeat: int, bandwidth: float):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    grad = torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device)

    def forward(impl):
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)

    def forward_backward(impl):
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
        torch.autograd.grad(out, leaves, grad)  # no accumulation into .grad

    best = {impl: [float("inf")] * 2 for impl in impls}
    for _ in range(repeat + 1):  # the first round warms up (kernel builds, allocator)
        for impl in impls:
            for i, fn in enumerate((forward, forward_backward)):
                best[impl][i] = min(best[impl][i], timed(lambda: fn(impl), device))
    floors = [n / bandwidth for n in floor_bytes(inputs)]
    ref = best["reference"]
    print(f"\n{name}: Q={loc.shape[1]}, S={value.shape[1]}  "
          f"(floor: fwd {floors[0] * 1e3:.2f} ms, fwd+bwd {floors[1] * 1e3:.2f} ms)")
    print(f"{'path':<10} {'fwd ms':>9} {'vs ref':>7} {'/floor':>7} {'fwd+bwd ms':>11} "
          f"{'vs ref':>7} {'/floor':>7}")
    for impl, (f, fb) in best.items():
        print(f"{impl:<10} {f * 1e3:9.2f} {ref[0] / f:6.1f}x {f / floors[0]:6.1f}x "
              f"{fb * 1e3:11.2f} {ref[1] / fb:6.1f}x {fb / floors[1]:6.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    impls = ["reference"]
    if args.device == "cpu" and load_cpu_kernel() is not None:
        impls.append("cpu")
    if args.device == "cuda" and triton_available():
        impls.append("triton")
    bandwidth = copy_bandwidth(args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, load average {os.getloadavg()[0]:.1f}")
    for name, num_queries in (("encoder", None), ("decoder", 300)):
        bench(name, make_inputs(num_queries, args.device), impls, args.device, args.repeat,
              bandwidth)


if __name__ == "__main__":
    main()
