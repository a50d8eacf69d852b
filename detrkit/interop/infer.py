"""A detrkit :class:`Config` read off a state dict in detrkit's names (official checkpoints carry
no usable config), and the shared prediction heads that foreign files store only once.

Read from the weights: the architecture (``transformer.level_embed``: Deformable DETR), d_model,
layer counts, FFN width, queries, classes, position encoding (learned: ``row_embed``), backbone
(block type from ``conv3``, depth from the block counts), and for Deformable DETR the feature
levels, refinement (``transformer.decoder.bbox_embed``), two-stage (``transformer.enc_output``) and
heads x points. Not in the weights, so taken from ``hints`` (the official ``args``, a HuggingFace
config or the caller): ``nheads`` (default 8), ``dilation`` (DC5; default False),
``num_queries`` of a two-stage model (default 300).
"""
from __future__ import annotations

import re

from torch import Tensor

from detrkit.backbone import _ARCHS
from detrkit.config import Config
from detrkit.errors import CheckpointError
from detrkit.presets import preset

_HEAD = re.compile(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_backbone(state: dict[str, Tensor], source: str) -> str:
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    depths = tuple(_count(state, f"backbone.body.layer{i}.") for i in range(1, 5))
    for name, (block, arch_depths) in _ARCHS.items():
        if (block.__name__ == "Bottleneck") == bottleneck and arch_depths == depths:
            return name
    raise CheckpointError(f"{source}: the backbone ({'bottleneck' if bottleneck else 'basic'} blocks, "
                          f"{depths} per stage) is none of {', '.join(_ARCHS)}")


def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: not a DETR / Deformable DETR state dict (no {key})")
    return tuple(state[key].shape)


def infer_config(state: dict[str, Tensor], hints: dict, source: str = "checkpoint") -> Config:
    """The Config that builds a model these weights fit (names as in a detrkit state dict)."""
    deformable = "transformer.level_embed" in state
    cfg = preset("deformable_detr_r50" if deformable else "detr_r50")
    m, t = cfg.model, cfg.model.transformer
    m.backbone.name = infer_backbone(state, source)
    m.backbone.dilation = bool(hints.get("dilation") or False)
    m.backbone.weights = None
    m.position_embedding = "learned" if "position_encoding.row_embed.weight" in state else "sine"
    t.num_encoder_layers = _count(state, "transformer.encoder.layers.")
    t.num_decoder_layers = _count(state, "transformer.decoder.layers.")
    t.dim_feedforward = _shape(state, "transformer.encoder.layers.0.linear1.weight", source)[0]
    t.nheads = int(hints.get("nheads") or 8)
    class_key = "class_embed.weight"
    if deformable:  # a HuggingFace two-stage file keeps the heads under transformer.decoder only
        class_key = next((k for k in ("class_embed.0.weight", "transformer.decoder.class_embed.0.weight")
                          if k in state), "class_embed.0.weight")
    classes = _shape(state, class_key, source)[0]
    if deformable:
        L, t.d_model = _shape(state, "transformer.level_embed", source)
        m.num_feature_levels = L
        m.with_box_refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in state
        m.two_stage = "transformer.enc_output.weight" in state
        m.num_queries = (int(hints.get("num_queries") or 300) if m.two_stage
                         else _shape(state, "query_embed.weight", source)[0])
        m.num_classes = classes  # sigmoid focal classes: no "no object" output
        for part, field in (("encoder", "enc_n_points"), ("decoder", "dec_n_points")):
            attn = "self_attn" if part == "encoder" else "cross_attn"
            rows = _shape(state, f"transformer.{part}.layers.0.{attn}.attention_weights.weight", source)[0]
            if rows % (t.nheads * L):
                raise CheckpointError(f"{source}: {part} attention_weights has {rows} rows, not a multiple of "
                                      f"nheads {t.nheads} x levels {L}; pass the right nheads")
            setattr(m, field, rows // (t.nheads * L))
    else:
        t.d_model = _shape(state, "transformer.decoder.norm.weight", source)[0]
        m.num_queries = _shape(state, "query_embed.weight", source)[0]
        m.num_classes = classes - 1  # softmax: the last output is "no object"
    if t.d_model % t.nheads:
        raise CheckpointError(f"{source}: d_model {t.d_model} is not divisible by nheads {t.nheads}")
    return cfg


def fill_shared_heads(state: dict[str, Tensor], expected: list[str]) -> dict[str, Tensor]:
    """Add the head entries a file stores once for several indices: a HuggingFace file keeps
    ``class_embed.0`` for all shared class heads, and ``model.decoder.bbox_embed.i`` for the
    ``bbox_embed.i`` it aliases. Each missing ``[transformer.decoder.]{class,bbox}_embed.i.*`` entry
    of ``expected`` is taken from its alias, or else from index 0 (the tie HuggingFace applies)."""
    state = dict(state)
    for key in expected:
        if key in state or not (m := _HEAD.match(key)):
            continue
        head, i, rest = m.groups()
        for alias in (f"{head}.{i}.{rest}", f"transformer.decoder.{head}.{i}.{rest}", f"{head}.0.{rest}",
                      f"transformer.decoder.{head}.0.{rest}"):
            if alias in state:
                state[key] = state[alias]
                break
    return state
