"""Multi-scale deformable attention sampling (Deformable DETR, Zhu et al. 2021).

For every query q and head m the output is a weighted sum of bilinearly sampled values:

    out[b, q, m] = sum_{l, p} A[b, q, m, l, p] * bilinear(value_l[b, :, :, m], loc[b, q, m, l, p])

with the sampling convention of ``grid_sample(align_corners=False, padding_mode="zeros")``:
pixel coordinate = loc * size - 0.5, corners outside the map contribute zero.

Three implementations sit behind :func:`ms_deform_attn`: ``"reference"`` (per-level
``grid_sample``), ``"cpu"`` (a C++ kernel compiled on first use, see ``ms_deform_attn_cpu``)
and ``"triton"`` (fused CUDA kernels, see ``ms_deform_attn_triton``).
"""
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .ms_deform_attn_cpu import ms_deform_attn_cpu

IMPLS = ("auto", "reference", "cpu", "triton")
ENV_VAR = "DETRKIT_MSDA_IMPL"


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Plain formula with one ``grid_sample`` per level. Shapes as in :func:`ms_deform_attn`."""
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # grid_sample's [-1, 1] grid with align_corners=False is exactly loc * size - 0.5 in pixels.
    grids = 2 * sampling_locations - 1
    sampled = []
    for l, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        grid_l = grids[:, :, :, l].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*M, D, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B*M, D, Q)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


def check_shapes(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Raise ValueError unless the shapes agree (the kernels index memory with them)."""
    if value.dim() != 4 or sampling_locations.dim() != 6:
        raise ValueError("ms_deform_attn: value must be (B, S, M, D) and sampling_locations "
                         f"(B, Q, M, L, P, 2), got {tuple(value.shape)} and "
                         f"{tuple(sampling_locations.shape)}")
    B, _, M, _ = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    expected = {"sampling_locations": (B, Q, M, L, P, 2), "attention_weights": (B, Q, M, L, P),
                "spatial_shapes": (L, 2), "level_start_index": (L,)}
    for name, t in zip(expected, (sampling_locations, attention_weights, spatial_shapes,
                                  level_start_index)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"ms_deform_attn: {name} must be {expected[name]} for value "
                             f"{tuple(value.shape)}, got {tuple(t.shape)}")


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (it is never required)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """The path that ``impl`` means for tensors on ``device``; with ``"auto"`` the
    ``DETRKIT_MSDA_IMPL`` environment variable, when set, decides instead."""
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"ms_deform_attn: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if impl == "cpu" and device.type != "cpu":
        raise ValueError(f"ms_deform_attn: impl='cpu' needs CPU tensors, got {device.type}")
    if impl == "triton" and not triton_available():
        raise RuntimeError("ms_deform_attn: impl='triton' needs the triton package")
    return impl


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor,
                   impl: str = "auto") -> Tensor:
    """Multi-scale deformable attention sampling.

    Args:
        value: (B, S, M, D) per-head values of all levels flattened, S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) long, (H_l, W_l) of each level.
        level_start_index: (L,) long, offset of each level in S.
        sampling_locations: (B, Q, M, L, P, 2), normalised (x, y); [0, 1] covers the map.
        attention_weights: (B, Q, M, L, P).
        impl: "auto" (Triton on CUDA when installed, the compiled kernel on CPU, else the
            reference), "reference", "cpu" or "triton". With "auto" the environment variable
            DETRKIT_MSDA_IMPL, when set, chooses instead.

    Returns:
        (B, Q, M * D), in the dtype of ``value``.
    """
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    impl = resolve_impl(impl, value.device)
    if impl == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights)
    # The kernels are written for float32/float64; half precision is computed in float32.
    dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
    args = (value.to(dtype), spatial_shapes, level_start_index,
            sampling_locations.to(dtype), attention_weights.to(dtype))
    if impl == "cpu":
        out = ms_deform_attn_cpu(*args)
        if out is None:  # the kernel could not be built; ms_deform_attn_cpu has warned once
            out = ms_deform_attn_reference(*args)
    else:
        from .ms_deform_attn_triton import ms_deform_attn_triton  # imports triton
        out = ms_deform_attn_triton(*args)
    return out.to(value.dtype)
