"""HuggingFace transformers parameter names <-> detrkit's, for ``DetrForObjectDetection`` and
``DeformableDetrForObjectDetection``.

Files written by ``save_pretrained`` use the names transformers 4.x used in memory (5.x renames on
load): ``model.backbone.conv_encoder.model.*``, ``out_proj``, ``fc1``/``fc2``. Names in 5.x memory
form (``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``) are first brought to that form. Attention
is three ``q_proj``/``k_proj``/``v_proj`` linears where detrkit (like ``nn.MultiheadAttention``)
stacks them in ``in_proj_weight``/``in_proj_bias``. The backbone is either transformers' ResNet
(``embedder``/``encoder.stages``) or timm's, whose names are torchvision's.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

BACKBONE = "model.backbone.conv_encoder.model."

# whole-key prefixes, HuggingFace -> detrkit
_DETR_TOP = {
    "model.input_projection": "input_proj",
    "model.query_position_embeddings": "query_embed",
    "model.decoder.layernorm": "transformer.decoder.norm",
    "model.position_embedding.row_embeddings": "position_encoding.row_embed",
    "model.position_embedding.column_embeddings": "position_encoding.col_embed",
    "class_labels_classifier": "class_embed",
    "bbox_predictor": "bbox_embed",
    "model.encoder.layers": "transformer.encoder.layers",
    "model.decoder.layers": "transformer.decoder.layers",
}
_DEFORMABLE_TOP = {
    "model.input_proj": "input_proj",
    "model.query_position_embeddings": "query_embed",
    "model.level_embed": "transformer.level_embed",
    "model.reference_points": "transformer.reference_points",
    "model.enc_output": "transformer.enc_output",
    "model.enc_output_norm": "transformer.enc_output_norm",
    "model.pos_trans": "transformer.pos_trans",
    "model.pos_trans_norm": "transformer.pos_trans_norm",
    "model.position_embedding.row_embeddings": "position_encoding.row_embed",
    "model.position_embedding.column_embeddings": "position_encoding.col_embed",
    "model.decoder.bbox_embed": "transformer.decoder.bbox_embed",
    "model.decoder.class_embed": "transformer.decoder.class_embed",
    "class_embed": "class_embed",
    "bbox_embed": "bbox_embed",
    "model.encoder.layers": "transformer.encoder.layers",
    "model.decoder.layers": "transformer.decoder.layers",
}
# inside one layer, HuggingFace -> detrkit
_LAYERS = {
    ("detr", "encoder"): {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "fc1": "linear1",
                          "fc2": "linear2", "final_layer_norm": "norm2"},
    ("detr", "decoder"): {"self_attn": "self_attn", "self_attn_layer_norm": "norm1",
                          "encoder_attn": "multihead_attn", "encoder_attn_layer_norm": "norm2",
                          "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3"},
    ("deformable_detr", "encoder"): {"self_attn": "self_attn", "self_attn_layer_norm": "norm1",
                                     "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"},
    ("deformable_detr", "decoder"): {"self_attn": "self_attn", "self_attn_layer_norm": "norm2",
                                     "encoder_attn": "cross_attn", "encoder_attn_layer_norm": "norm1",
                                     "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3"},
}
# transformers 5.x in-memory names -> the on-disk (4.x) names
_TO_DISK = ((re.compile(r"^model\.backbone\.model\."), BACKBONE),
            (re.compile(r"^model\.backbone\.position_embedding\."), "model.position_embedding."),
            (re.compile(r"\.o_proj\."), ".out_proj."),
            (re.compile(r"\.layers\.(\d+)\.mlp\.fc([12])\."), r".layers.\1.fc\2."))


def _prefix_map(key: str, table: dict[str, str]) -> str | None:
    best = max((k for k in table if key == k or key.startswith(k + ".")), key=len, default=None)
    return None if best is None else table[best] + key[len(best):]


# ---------------------------------------------------------------- backbone

_HF_RESNET = ((re.compile(r"^embedder\.embedder\.convolution\."), lambda m: "conv1."),
              (re.compile(r"^embedder\.embedder\.normalization\."), lambda m: "bn1."),
              (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\."),
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}."),
              (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\."),
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}{int(m[3]) + 1}."))
_TV_RESNET = ((re.compile(r"^conv1\."), lambda m: "embedder.embedder.convolution."),
              (re.compile(r"^bn1\."), lambda m: "embedder.embedder.normalization."),
              (re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\."),
               lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut."
                         f"{'convolution' if m[3] == '0' else 'normalization'}."),
              (re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\."),
               lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}."
                         f"{'convolution' if m[3] == 'conv' else 'normalization'}."))


def _sub_first(key: str, rules) -> str | None:
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return repl(m) + key[m.end():]
    return None


def backbone_layout(state: dict[str, Tensor]) -> str:
    """"hf" (transformers' ResNet) or "timm" (torchvision names)."""
    return "hf" if any(k.startswith(BACKBONE + "embedder.") for k in state) else "timm"


# ---------------------------------------------------------------- whole models

def to_disk_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in _TO_DISK:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def hf_to_detrkit(state: dict[str, Tensor], model_type: str) -> tuple[dict[str, Tensor], list[str]]:
    """A HuggingFace state dict in detrkit's names, and the keys that have no detrkit counterpart."""
    state = to_disk_names({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    top = _DETR_TOP if model_type == "detr" else _DEFORMABLE_TOP
    layout = backbone_layout(state)
    out, unknown = {}, []
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(BACKBONE):
            sub = key[len(BACKBONE):]
            sub = _sub_first(sub, _HF_RESNET) if layout == "hf" else sub
            new = None if sub is None else "backbone.body." + sub
        else:
            new = _prefix_map(key, top)
            m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", new or "")
            if m:
                rest = _prefix_map(m[3], _LAYERS[(model_type, m[1])])
                new = None if rest is None else f"transformer.{m[1]}.layers.{m[2]}.{rest}"
                p = re.match(r"^(.+)\.([qkv])_proj\.(weight|bias)$", new or "")
                if p:  # stacked below
                    qkv.setdefault(f"{p[1]}.in_proj_{p[3]}", {})[p[2]] = value
                    continue
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{key} (has only {sorted(parts)} of q, k, v)")
            continue
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out, unknown


def detrkit_to_hf(state: dict[str, Tensor], model_type: str, layout: str = "hf") -> dict[str, Tensor]:
    """A detrkit state dict in the names ``save_pretrained`` writes (the inverse of ``hf_to_detrkit``)."""
    top = {v: k for k, v in (_DETR_TOP if model_type == "detr" else _DEFORMABLE_TOP).items()}
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.body."):
            sub = key[len("backbone.body."):]
            out[BACKBONE + (_sub_first(sub, _TV_RESNET) if layout == "hf" else sub)] = value
            continue
        m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
        if m:
            layer = {v: k for k, v in _LAYERS[(model_type, m[1])].items()}
            rest = m[3]
            a = re.match(r"^(.+)\.in_proj_(weight|bias)$", rest)
            if a:
                base = _prefix_map(a[1], layer)
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"model.{m[1]}.layers.{m[2]}.{base}.{name}_proj.{a[2]}"] = part
                continue
            out[f"model.{m[1]}.layers.{m[2]}.{_prefix_map(rest, layer)}"] = value
            continue
        new = _prefix_map(key, top)
        if new is None:
            raise KeyError(f"no HuggingFace name for detrkit parameter {key}")
        out[new] = value
    return out
