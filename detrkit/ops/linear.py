"""Linear layers through oneDNN on CPU.

``torch.nn.functional.linear`` on CPU float32 is MKL's GEMM, which on this project's machine (AMD
EPYC, AVX-512) ran the transformers' shapes at 120-170 GFLOP/s; oneDNN's matmul, the one
PyTorch's own compiler uses for CPU linears (``torch.ops.mkldnn._linear_pointwise``), ran them at
180-210. Measured, ms: a Deformable-DETR encoder FFN of batch 2 at 512x512 (10880 tokens,
256 -> 1024) 40 vs 45 forward, 26 vs 32 for the input gradient; a DETR decoder FFN (200 queries,
256 -> 2048) 1.06 vs 1.70 forward. MKL stays faster for the weight gradient (a GEMM over the
tokens), so the backward keeps it there. oneDNN costs ~15 us more per call, so products
below ``MIN_MACS`` multiply-adds (break-even here) stay with MKL too. Elsewhere (other devices or
dtypes, autocast, torch.compile, a torch without the operator) this is ``F.linear``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

MIN_MACS = 1 << 24  # e.g. 256 tokens x 256 -> 256


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear and it computes ``F.linear`` (checked once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    try:
        return torch.allclose(_onednn(x, w, b), F.linear(x, w, b), atol=1e-5)
    except RuntimeError:  # built without the CPU kernels it needs
        return False


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """x: (N, C), weight: (O, C) any strides -> (N, O), through a ReLU when ``relu``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


class _LinearCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
        out = _onednn(x, weight, bias, relu)
        ctx.save_for_backward(x, weight, out if relu else None)
        ctx.with_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, out = ctx.saved_tensors
        # ReLU's own backward (zero where the output is): one pass
        grad = grad.contiguous() if out is None else torch.ops.aten.threshold_backward(grad, out, 0)
        # grad @ weight is a linear with weight.t(); oneDNN takes the transposed view as it is
        grad_x = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.with_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then ``F.relu`` when ``relu``: x (..., C), weight (O, C), bias
    (O,) -> (..., O). CPU float32 goes through oneDNN (see the module docstring), with the ReLU
    applied as the product is written.

    The ReLU is never applied in place: ``F.linear``'s output on a batch of matrices is a view, and
    autograd handles an in-place op on a view by copying the whole gradient (CopySlices), which took
    8% of a Deformable-DETR-R50 training step."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    # under torch.compile, F.linear: inductor cannot lower the oneDNN op with an unpacked weight,
    # and on CPU it picks oneDNN for linears itself
    if (x.device.type != "cpu" or any(t.dtype != torch.float32 or t.device != x.device for t in tensors)
            or math.prod(x.shape[:-1]) * weight.numel() < MIN_MACS or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling() or not onednn_available()):
        out = F.linear(x, weight, bias)
        return F.relu(out) if relu else out
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = _LinearCPU.apply(rows, weight, bias, relu)
    else:
        out = _onednn(rows, weight, bias, relu)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`linear`; same parameters and state-dict names."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """x: (..., in_features) -> (..., out_features), through a ReLU when ``relu``."""
        return linear(x, self.weight, self.bias, relu)
