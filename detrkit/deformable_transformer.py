"""Deformable DETR's transformer: deformable encoder over all levels, decoder around reference points.

Parameter names are those of the official implementation, so its checkpoints map one to one.
Coordinates: reference points and boxes are normalised to the whole padded image, and scaled by
the per-image ``valid_ratios`` whenever they index a feature map, so padding never shifts them.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from detrkit.config import ModelConfig
from detrkit.deformable_attention import MSDeformAttn
from detrkit.ops.dropout import Dropout
from detrkit.ops.linear import Linear
from detrkit.recollection import State, run_stages
from detrkit.transformer import MultiheadAttention, grouped_self_attention, with_pos


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: Tensor) -> Tensor:
    """mask: (B, H, W), True = padding -> (B, 2): the unpadded fraction of the width and height."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w / W, valid_h / H], -1).float()


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Every token's pixel centre, normalised by its level's valid size, then mapped onto every level.

    spatial_shapes: L (H, W) pairs; ratios: (B, L, 2). Returns (B, S, L, 2) as (x, y)."""
    points = []
    for lvl, (H, W) in enumerate(spatial_shapes):
        y, x = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, device=ratios.device),
                              torch.linspace(0.5, W - 0.5, W, device=ratios.device), indexing="ij")
        y = y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * H)
        x = x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * W)
        points.append(torch.stack([x, y], -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: (B, S, d); reference_points: (B, S, L, 2); padding_mask: (B, S) or None. Returns (B, S, d)."""
        attended = self.self_attn(with_pos(src, pos), reference_points, src, spatial_shapes,
                                  level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.linear1(src, relu=True)))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                ratios: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: (B, S, d) all levels' tokens; ratios: (B, L, 2); padding_mask: (B, S), or None when
        nothing is padded. Returns (B, S, d)."""
        shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
        reference_points = encoder_reference_points(shapes, ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, memory_mask: Tensor | None,
                num_groups: int = 1) -> Tensor:
        """tgt, query_pos: (B, G*N, d) for G query groups; reference_points: (B, G*N, L, 2 or 4);
        memory: (B, S, d); memory_mask: (B, S), True = padding, or None. Returns (B, G*N, d)."""
        q = with_pos(tgt, query_pos)
        tgt = self.norm2(tgt + self.dropout2(grouped_self_attention(self.self_attn, q, tgt, num_groups)))
        attended = self.cross_attn(with_pos(tgt, query_pos), reference_points, memory, spatial_shapes,
                                   level_start_index, memory_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(self.linear1(tgt, relu=True)))
        return self.norm3(tgt + self.dropout4(ffn))


def as_boxes(reference: Tensor) -> Tensor:
    """(..., 2) centres -> (..., 4) boxes of size 0.5 (zero in inverse-sigmoid space), which
    :func:`refine_boxes` treats exactly like the centres; (..., 4) boxes pass unchanged."""
    if reference.shape[-1] == 4:
        return reference
    return torch.cat([reference, torch.full_like(reference, 0.5)], -1)


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Iterative box refinement: the head predicts a correction in inverse-sigmoid space.

    delta: (..., 4); reference: (..., 2) centres or (..., 4) boxes in [0, 1] -> boxes (..., 4) in [0, 1]."""
    return (delta + inverse_sigmoid(as_boxes(reference))).sigmoid()


class DeformableTransformerDecoder(nn.Module):
    """Decoder layers; with iterative refinement (``bbox_embed`` set by the model) each layer moves
    the reference points to the boxes predicted by the previous one."""

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int, recollection: str = "none",
                 recurrent_steps: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.recollection = recollection  # used in training only
        self.recurrent_steps = recurrent_steps  # > 0: a single-stage model looped this many times
        self.bbox_embed: nn.ModuleList | None = None  # per-layer box heads when refining
        self.class_embed: nn.ModuleList | None = None  # two-stage: the encoder head is class_embed[-1]

    def stage(self, i: int, tgt: Tensor, reference_points: Tensor, query_pos: Tensor, memory: Tensor,
              spatial_shapes: Tensor, level_start_index: Tensor, ratios: Tensor, memory_mask: Tensor | None,
              num_groups: int = 1) -> tuple[Tensor, Tensor]:
        """Decoder layer ``i`` on (B, G*N, ·) queries. Returns the new queries and reference points."""
        scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
        reference_input = reference_points[:, :, None] * scale[:, None]
        tgt = self.layers[i](tgt, query_pos, reference_input, memory, spatial_shapes, level_start_index,
                             memory_mask, num_groups)
        if self.bbox_embed is not None:
            # the next layer starts from this layer's boxes; gradients do not flow through them
            reference_points = refine_boxes(self.bbox_embed[i](tgt), reference_points).detach()
        return tgt, reference_points

    def forward(self, tgt: Tensor, reference_points: Tensor, query_pos: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, ratios: Tensor,
                memory_mask: Tensor | None) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """tgt, query_pos: (B, N, d); reference_points: (B, N, 2 or 4). Per stage i, returns its output
        (B, G_i*N, d) for its G_i query groups (1 at inference), the reference boxes it started from
        (B, G_i*N, 4; 2-d reference points as :func:`as_boxes`), and G_i."""
        def stage(i: int, state: State, num_groups: int) -> State:
            return self.stage(i, *state, query_pos.repeat(1, num_groups, 1), memory, spatial_shapes,
                              level_start_index, ratios, memory_mask, num_groups)

        mode = self.recollection if self.training else "none"
        stages = run_stages(stage, (tgt, reference_points), self.num_layers, mode, self.recurrent_steps)
        references = [torch.cat([as_boxes(r) for _, r in s.inputs], 1) for s in stages]
        return [s.outputs[0] for s in stages], references, [s.num_groups for s in stages]


def proposal_pos_embed(boxes: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of proposal boxes (two-stage queries). boxes: (B, N, 4) unnormalised logits
    -> (B, N, 4 * num_pos_feats)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = boxes.sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(2)


class DeformableTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.transformer
        d, self.d_model = t.d_model, t.d_model
        self.two_stage, self.num_queries = cfg.two_stage, cfg.num_queries
        L = cfg.num_feature_levels
        enc_layer = DeformableTransformerEncoderLayer(d, t.dim_feedforward, t.dropout, L, t.nheads, cfg.enc_n_points)
        self.encoder = DeformableTransformerEncoder(enc_layer, t.num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(d, t.dim_feedforward, t.dropout, L, t.nheads, cfg.dec_n_points)
        self.decoder = DeformableTransformerDecoder(dec_layer, t.num_decoder_layers, cfg.recollection,
                                                    cfg.recurrent_steps)
        self.level_embed = nn.Parameter(torch.empty(L, d))
        if self.two_stage:
            self.enc_output = Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            self.reference_points = Linear(d, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> dict:
        """srcs, pos_embeds: L maps (B, d, H_l, W_l); masks: L (B, H_l, W_l). Flattens the levels and
        runs the encoder. Returns a dict with memory (B, S, d), mask (B, S), padding_mask (the mask, or
        None when nothing is padded), spatial_shapes (L, 2), level_start_index (L,) and valid ratios (B, L, 2)."""
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        # without padding (one image, or images of one size) there are no values to zero: 0.9 ms per
        # attention layer at 512x512
        padding_mask = mask if mask.any() else None
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, ratios, padding_mask)
        return {"memory": memory, "mask": mask, "padding_mask": padding_mask, "spatial_shapes": spatial_shapes,
                "level_start_index": level_start_index, "ratios": ratios}

    def encoder_proposals(self, memory: Tensor, mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Two-stage: one proposal per encoder token, a box centred on it of size 0.05 * 2^level.

        Returns the projected memory (B, S, d) and the proposals (B, S, 4) in inverse-sigmoid space
        (inf where the token is padding or the proposal touches the image border)."""
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            m = mask[:, start:start + H * W].view(B, H, W)
            valid = torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).view(B, 1, 1, 2)
            y, x = torch.meshgrid(torch.arange(H, device=memory.device, dtype=torch.float32),
                                  torch.arange(W, device=memory.device, dtype=torch.float32), indexing="ij")
            centres = (torch.stack([x, y], -1)[None] + 0.5) / valid
            sizes = torch.full_like(centres, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat([centres, sizes], -1).view(B, -1, 4))
            start += H * W
        proposals = torch.cat(proposals, 1)
        keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(~keep, float("inf"))
        output = memory.masked_fill(~keep, 0.0)
        return self.enc_output_norm(self.enc_output(output)), proposals

    def queries(self, enc: dict, query_embed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, dict | None]:
        """The decoder's initial queries: (tgt, query_pos, reference_points, encoder outputs or None).

        One-stage: learned query and position embeddings, reference points predicted from the
        latter. Two-stage: the top-scoring encoder proposals become the reference boxes and their
        sine embedding the queries; the encoder's predictions are returned for supervision."""
        memory = enc["memory"]
        B = memory.shape[0]
        if not self.two_stage:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos, tgt = query_pos.expand(B, -1, -1), tgt.expand(B, -1, -1)
            return tgt, query_pos, self.reference_points(query_pos).sigmoid(), None
        output, proposals = self.encoder_proposals(memory, enc["mask"], enc["spatial_shapes"])
        head = self.decoder.num_layers  # the heads after the decoder's own are the encoder's
        enc_logits = self.decoder.class_embed[head](output)
        enc_boxes = self.decoder.bbox_embed[head](output) + proposals
        topk = torch.topk(enc_logits[..., 0], self.num_queries, dim=1).indices
        boxes = torch.gather(enc_boxes, 1, topk[..., None].expand(-1, -1, 4)).detach()
        pos = proposal_pos_embed(boxes, num_pos_feats=self.d_model // 2)
        query_pos, tgt = self.pos_trans_norm(self.pos_trans(pos)).split(self.d_model, dim=2)
        return tgt, query_pos, boxes.sigmoid(), {"pred_logits": enc_logits, "pred_boxes": enc_boxes.sigmoid()}
