"""The official implementations' parameter names <-> detrkit's.

detrkit's modules carry the official names, so the mapping is the two wrappers the official code
puts around the backbone. Checked file by file against the official model definitions:

* ``models/backbone.py`` (both repos): ``Joiner(backbone, position_embedding)`` is an
  ``nn.Sequential``, so the ResNet body (torchvision's, through ``IntermediateLayerGetter``, which
  drops ``avgpool``/``fc``) is ``backbone.0.body.*`` and the position encoding ``backbone.1.*``;
  its ``FrozenBatchNorm2d`` keeps weight, bias, running_mean, running_var. detrkit: ``backbone.body.*``.
* ``models/position_encoding.py``: the sine encoding has no parameters; the learned one has
  ``row_embed``, ``col_embed`` (50 x d/2). detrkit: ``position_encoding.row_embed``/``col_embed``.
* ``models/transformer.py`` (DETR): ``transformer.encoder.layers.N.{self_attn, linear1, linear2,
  norm1, norm2}``, ``transformer.decoder.layers.N.{self_attn, multihead_attn, linear1, linear2,
  norm1, norm2, norm3}``, ``transformer.decoder.norm``; attention is ``nn.MultiheadAttention``
  (``in_proj_weight``, ``in_proj_bias``, ``out_proj``). Same in detrkit (``detrkit/transformer.py``).
  The pre-norm variant (``--pre_norm``, ``transformer.encoder.norm``) is not supported.
* ``models/detr.py``: ``query_embed``, ``input_proj`` (a 1x1 conv), ``class_embed``,
  ``bbox_embed.layers.{0,1,2}``. Same in detrkit (``detrkit/detr.py``).
* ``models/deformable_transformer.py``: ``transformer.level_embed``, ``transformer.encoder.layers.N.
  {self_attn, norm1, linear1, linear2, norm2}``, ``transformer.decoder.layers.N.{cross_attn, norm1,
  self_attn, norm2, linear1, linear2, norm3}``, then ``transformer.reference_points`` (one-stage) or
  ``transformer.{enc_output, enc_output_norm, pos_trans, pos_trans_norm}`` (two-stage).
  ``models/ops/modules/ms_deform_attn.py``: ``sampling_offsets``, ``attention_weights``,
  ``value_proj``, ``output_proj``. Same in detrkit (``detrkit/deformable_*.py``).
* ``models/deformable_detr.py``: ``query_embed`` (2d wide; absent in two-stage), ``input_proj.N.{0,1}``
  (conv, GroupNorm), ``class_embed.N``, ``bbox_embed.N.layers.M`` (one per prediction, shared
  modules listed under every index), ``transformer.decoder.bbox_embed`` (refinement) and
  ``transformer.decoder.class_embed`` (two-stage) aliasing them. Same in detrkit.
"""
from __future__ import annotations

from torch import Tensor

from detrkit.errors import CheckpointError

# official prefix -> detrkit prefix
PREFIXES = (("backbone.0.body.", "backbone.body."), ("backbone.1.", "position_encoding."))


def _rename(state: dict[str, Tensor], pairs) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def is_official(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("backbone.0.body.") for k in state)


def official_to_detrkit(state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """An official DETR / Deformable DETR state dict in detrkit's names."""
    if "transformer.encoder.norm.weight" in state:
        raise CheckpointError(f"{source}: a pre-norm DETR (--pre_norm: transformer.encoder.norm); "
                              "detrkit implements the post-norm transformer only")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return _rename(state, PREFIXES)


def detrkit_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detrkit state dict in the official implementation's names (the inverse of the above)."""
    return _rename(state, [(new, old) for old, new in PREFIXES])
