"""DETR's transformer: post-norm encoder and decoder on ``scaled_dot_product_attention``.

Differences from ``nn.Transformer`` follow the DETR paper: positional encodings are added to
queries and keys at every layer (never to values), the decoder's object queries enter as
positional encodings of an all-zero target, and the decoder returns every layer's output
(after the shared final norm) so that every layer can be supervised.

Parameter names are those of the official implementation, so its checkpoints map one to one.

Query groups: the decoder's queries may hold G independent groups laid side by side along the
query axis, (B, G*N, d) (query recollection, see ``detrkit.recollection``). Self-attention runs
per group; cross-attention and the FFN treat each query on its own anyway, so groups share the
encoder memory and its key/value projections instead of repeating them G times.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.config import TransformerConfig
from detrkit.ops.dropout import Dropout, dropout
from detrkit.ops.linear import Linear, linear
from detrkit.recollection import State, run_stages


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names (so official DETR
    weights load as they are), computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nheads:
            raise ValueError(f"d_model {d_model} is not divisible by nheads {nheads}")
        self.nheads, self.dropout = nheads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """query: (B, Nq, d); key, value: (B, Nk, d); key_padding_mask: (B, Nk), True = ignore.
        Returns (B, Nq, d)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (self._heads(linear(x, w, b)) for x, w, b in
                   ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        dtype = q.dtype
        if q.device.type == "cpu" and dtype == torch.bfloat16:
            # SDPA's CPU backward in bfloat16 is 7x slower than in float32 (B 8, 8 heads, 50 queries
            # of 16: 4.6 vs 0.7 ms): 2% of the demo's mixed-precision step. These tensors are small.
            q, k, v = q.float(), k.float(), v.float()
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            out = _attention_with_dropout(q, k, v, key_padding_mask, self.dropout)
        else:
            attn_mask = None
            if key_padding_mask is not None:
                attn_mask = ~key_padding_mask[:, None, None, :]  # SDPA: True = take part
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2).to(dtype))

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.nheads, -1)).transpose(1, 2)  # (B, heads, N, d_head)


def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                            p: float) -> Tensor:
    """softmax(q k^T / sqrt(d)) with dropout, times v: SDPA's formula. On CPU, SDPA draws the dropout
    mask with ``bernoulli_``, 3.5 ms per call at DETR-R50's encoder shape (2 x 8 x 256 x 256); with
    :func:`detrkit.ops.dropout.dropout` instead, DETR-R50's transformer forward + backward took
    0.38 s instead of 0.44 s (batch 2, 512x512).
    q: (B, heads, Nq, d_head); k, v: (B, heads, Nk, d_head); key_padding_mask: (B, Nk), True = ignore."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return dropout(scores.softmax(-1), p, True) @ v


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(d, cfg.nheads, cfg.dropout)
        self.linear1 = Linear(d, cfg.dim_feedforward)
        self.linear2 = Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = Dropout(cfg.dropout)  # inside the FFN
        self.dropout1, self.dropout2 = Dropout(cfg.dropout), Dropout(cfg.dropout)

    def forward(self, src: Tensor, mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """src, pos: (B, S, d); mask: (B, S), True = padding."""
        q = k = with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, mask)))
        ffn = self.linear2(self.dropout(self.linear1(src, relu=True)))
        return self.norm2(src + self.dropout2(ffn))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(d, cfg.nheads, cfg.dropout)
        self.multihead_attn = MultiheadAttention(d, cfg.nheads, cfg.dropout)  # cross-attention
        self.linear1 = Linear(d, cfg.dim_feedforward)
        self.linear2 = Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = Dropout(cfg.dropout)
        self.dropout1, self.dropout2, self.dropout3 = (Dropout(cfg.dropout) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_mask: Tensor | None,
                pos: Tensor | None, num_groups: int = 1) -> Tensor:
        """tgt, query_pos: (B, G*N, d) for G query groups; memory, pos: (B, S, d);
        memory_mask: (B, S), True = padding. Returns (B, G*N, d)."""
        q = with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(grouped_self_attention(self.self_attn, q, tgt, num_groups)))
        attended = self.multihead_attn(with_pos(tgt, query_pos), with_pos(memory, pos), memory, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(self.linear1(tgt, relu=True)))
        return self.norm3(tgt + self.dropout3(ffn))


def grouped_self_attention(attn: nn.Module, qk: Tensor, value: Tensor, num_groups: int) -> Tensor:
    """Self-attention within each of ``num_groups`` query groups laid along the query axis.

    qk, value: (B, G*N, d). The groups are folded into the batch axis so no query attends to
    another group's queries. Returns (B, G*N, d)."""
    if num_groups == 1:
        return attn(qk, qk, value)
    B, GN, d = qk.shape
    qk, value = qk.reshape(B * num_groups, -1, d), value.reshape(B * num_groups, -1, d)
    return attn(qk, qk, value).reshape(B, GN, d)


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = _clones(TransformerEncoderLayer(cfg), cfg.num_encoder_layers)

    def forward(self, src: Tensor, mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: TransformerConfig, recollection: str = "none", recurrent_steps: int = 0):
        super().__init__()
        self.layers = _clones(TransformerDecoderLayer(cfg), cfg.num_decoder_layers)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.recollection = recollection  # used in training only
        self.recurrent_steps = recurrent_steps  # > 0: a single-stage model looped this many times

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_mask: Tensor | None,
                pos: Tensor | None) -> tuple[list[Tensor], list[int]]:
        """tgt, query_pos: (B, N, d). Returns every stage's output after the shared final norm,
        (B, G_i*N, d) for the G_i query groups of stage i (1 at inference), and the G_i."""
        def stage(i: int, state: State, num_groups: int) -> State:
            return (self.layers[i](state[0], query_pos.repeat(1, num_groups, 1), memory, memory_mask,
                                   pos, num_groups),)

        mode = self.recollection if self.training else "none"
        stages = run_stages(stage, (tgt,), len(self.layers), mode, self.recurrent_steps)
        return [self.norm(s.outputs[0]) for s in stages], [s.num_groups for s in stages]


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries."""

    def __init__(self, cfg: TransformerConfig, recollection: str = "none", recurrent_steps: int = 0):
        super().__init__()
        self.d_model = cfg.d_model
        self.encoder = TransformerEncoder(cfg)
        self.decoder = TransformerDecoder(cfg, recollection, recurrent_steps)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor,
                pos: Tensor) -> tuple[list[Tensor], list[int], Tensor]:
        """src, pos: (B, d, H, W); mask: (B, H, W), True = padding; query_embed: (N, d).

        Returns the decoder stages' outputs and group counts (see ``TransformerDecoder``) and the
        encoder memory (B, H*W, d)."""
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        return *self.decoder(tgt, query_pos, memory, mask, pos), memory


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))
