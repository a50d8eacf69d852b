"""Position encodings of feature maps, computed from the padding mask.

Both encodings give the valid region of an image the same values whether it is alone or padded
bottom/right inside a larger batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrkit.config import ConfigError


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding: y and x positions counted over non-padded pixels.

    With ``normalize`` the positions are ``(pos + offset) / (last valid pos + 1e-6) * scale``;
    ``offset`` is 0.0 in DETR and -0.5 in Deformable DETR (pixel centres).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.0):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, H, W) bool, True = padding -> (B, 2 * num_pos_feats, H, W) float32.

        Channels: the y encoding then the x encoding, each with sin on even and cos on odd
        channels.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # The last row/column holds the count of valid pixels, since padding is bottom/right.
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """DETR's learned encoding: one embedding per column and per row index, up to ``max_size``."""

    def __init__(self, num_pos_feats: int = 256, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, H, W) bool -> (B, 2 * num_pos_feats, H, W): column encoding, then row encoding.

        Indices count from the top-left corner, so bottom/right padding leaves the valid region
        unchanged.
        """
        b, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(f"feature map {h}x{w} is larger than the learned encoding's max_size {max_size}")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, F)
        pos = torch.cat((x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].repeat(b, 1, 1, 1)


def build_position_encoding(kind: str, d_model: int, offset: float = 0.0) -> nn.Module:
    """``kind``: "sine" or "learned"; the encoding has ``d_model`` channels.

    ``offset`` applies to the sine encoding only (-0.5 for Deformable DETR).
    """
    if d_model % 4:
        raise ConfigError(f"model.transformer.d_model: must be a multiple of 4 for a position encoding, "
                          f"got {d_model}")
    if kind == "sine":
        return PositionEmbeddingSine(d_model // 2, normalize=True, offset=offset)
    if kind == "learned":
        return PositionEmbeddingLearned(d_model // 2)
    raise ConfigError(f"model.position_embedding: unknown kind {kind!r}; choose sine or learned")
