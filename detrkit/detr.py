"""DETR: a CNN backbone, a transformer and set prediction heads (Carion et al., 2020)."""
from __future__ import annotations

from torch import Tensor, nn

from detrkit.backbone import Backbone
from detrkit.ops.linear import Linear
from detrkit.transformer import Transformer


class MLP(nn.Module):
    """A few linear layers with ReLU in between (the box head is a 3-layer MLP)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, relu=i < len(self.layers) - 1)
        return x


class DETR(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class and box heads for N object queries.

    The class head has ``num_class_outputs``: num_classes + 1 for the softmax loss, the last being
    "no object", or num_classes for the sigmoid focal loss. The box head
    predicts (cx, cy, w, h) normalised by the image size, through a sigmoid. The heads are shared
    by all decoder layers, whose outputs are returned as ``aux_outputs`` for the auxiliary losses.
    """

    def __init__(self, backbone: Backbone, position_encoding: nn.Module, transformer: Transformer,
                 num_class_outputs: int, num_queries: int, aux_loss: bool = True):
        super().__init__()
        d_model = transformer.d_model
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d_model, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = Linear(d_model, num_class_outputs)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.aux_loss = aux_loss

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True = padding.

        Returns ``pred_logits`` (B, N, num_class_outputs), ``pred_boxes`` (B, N, 4) cxcywh in
        [0, 1], and ``aux_outputs``: the same for every earlier decoder layer."""
        feature, feature_mask = self.backbone(images, mask)[-1]
        pos = self.position_encoding(feature_mask).to(feature.dtype)
        hs, num_groups, _ = self.transformer(self.input_proj(feature), feature_mask, self.query_embed.weight, pos)
        return set_outputs([self.class_embed(h) for h in hs], [self.bbox_embed(h).sigmoid() for h in hs],
                           num_groups, self.aux_loss)


def set_outputs(logits: list[Tensor], boxes: list[Tensor], num_groups: list[int], aux_loss: bool) -> dict:
    """Per decoder stage i: logits (B, G_i*N, C) and boxes (B, G_i*N, 4) for its G_i query groups.

    Returns the last stage's group 0 (the baseline path) as the predictions and, for the auxiliary
    losses, every other (stage, group) in stage order as ``aux_outputs``: one per earlier stage
    at inference, where every stage has one group."""
    outputs = [{"pred_logits": lg, "pred_boxes": bx}
               for stage_logits, stage_boxes, g in zip(logits, boxes, num_groups)
               for lg, bx in zip(stage_logits.chunk(g, dim=1), stage_boxes.chunk(g, dim=1))]
    out = outputs.pop(len(outputs) - num_groups[-1])
    if aux_loss:
        out["aux_outputs"] = outputs
    return out
