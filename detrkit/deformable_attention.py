"""Multi-scale deformable attention (Zhu et al., 2021, eq. 3), the module around the sampling op.

Each query looks at ``n_points`` points per head on each of ``n_levels`` feature maps, placed at
its reference point plus offsets predicted from the query, and mixes the bilinearly sampled
values with softmax weights (over levels x points) also predicted from the query.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrkit.ops import ms_deform_attn
from detrkit.ops.linear import Linear


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: offsets start on a ring of directions, one per head, with the
        k-th point k times further out; all points start equally weighted."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # onto the unit square's border
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """query: (B, Q, d); reference_points: (B, Q, L, 2) as (x, y) or (B, Q, L, 4) as (cx, cy, w, h),
        normalised to each level's valid area; value_input: (B, S, d) all levels' tokens;
        spatial_shapes: (L, 2) as (H, W); level_start_index: (L,); padding_mask: (B, S), True = padding.
        Returns (B, Q, d)."""
        B, Q, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (M, -1))
        offsets = self.sampling_offsets(query).view(B, Q, M, L * P * 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: scale by 1 / (W, H)
            centre, scale = reference_points, 1 / spatial_shapes.flip(-1).to(offsets.dtype)
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: half its size at offset n_points
            centre, scale = reference_points[..., :2], reference_points[..., 2:] * (0.5 / P)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        # centre + offsets * scale on (..., L * P * 2) rows: broadcasting over the short (L, P, 2)
        # axes instead runs elementwise loops of length 2, ten times slower on CPU
        locations = torch.addcmul(per_point(centre, P), offsets, per_point(scale, P)).view(B, Q, M, L, P, 2)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def per_point(x: Tensor, n_points: int) -> Tensor:
    """(..., L, 2) per level -> (..., 1, L * n_points * 2), repeated for every sampling point and
    broadcasting over the heads."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n_points, 2).flatten(-3).unsqueeze(-2)
