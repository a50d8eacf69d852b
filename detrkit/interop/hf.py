"""HuggingFace transformers folders (``save_pretrained``: config.json + weights) <-> detrkit.

Reading needs no transformers: the config is JSON and the weights safetensors (or a
``pytorch_model.bin`` read with ``weights_only``). Writing produces what ``save_pretrained`` of
``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` writes, with transformers' own
ResNet as the backbone (or timm's for a dilated, DC5, backbone: transformers' ResNet has no dilation).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import Tensor, nn

from detrkit.build import uses_focal_loss
from detrkit.config import Config
from detrkit.data.coco import CategoryMap
from detrkit.errors import CheckpointError
from detrkit.interop import hf_keys
from detrkit.interop.files import read_json, read_safetensors, read_sharded, read_state_dict

MODEL_TYPES = {"detr": "DetrForObjectDetection", "deformable_detr": "DeformableDetrForObjectDetection"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_RESNETS = {  # name: (layer_type, depths, hidden_sizes)
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json names a transformers ``model_type`` (detrkit's own has ``format``)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "format" not in config


def read_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        file = folder / name
        if file.is_file():
            if name.endswith(".index.json"):
                return read_sharded(folder, name)
            return read_safetensors(file) if file.suffix == ".safetensors" else read_state_dict(file)[0]
    raise CheckpointError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def _check(cond: bool, folder: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{folder / 'config.json'}: {what}")


def read_config(folder: Path) -> tuple[str, dict, CategoryMap | None]:
    """config.json -> (model_type, hints for :func:`detrkit.interop.infer.infer_config`, categories)."""
    c = read_json(folder / "config.json")
    model_type = c.get("model_type")
    _check(model_type in MODEL_TYPES, folder, f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    _check(c.get("activation_function", "relu") == "relu", folder, "activation_function must be relu")
    heads = {c.get("encoder_attention_heads", 8), c.get("decoder_attention_heads", 8)}
    _check(len(heads) == 1, folder, "encoder and decoder attention heads differ; detrkit uses one nheads")
    _check(c.get("encoder_ffn_dim") == c.get("decoder_ffn_dim"), folder,
           "encoder_ffn_dim and decoder_ffn_dim differ; detrkit uses one dim_feedforward")
    bb = c.get("backbone_config") or {}
    if bb.get("model_type") == "resnet":
        _check(bb.get("hidden_act", "relu") == "relu" and not bb.get("downsample_in_bottleneck")
               and not bb.get("downsample_in_first_stage") and bb.get("embedding_size", 64) == 64, folder,
               "backbone_config: only torchvision-style ResNets load (relu, stride on the 3x3 conv, 64-wide stem)")
    elif bb:
        _check(bb.get("model_type") == "timm_backbone", folder,
               f"backbone_config.model_type {bb.get('model_type')!r}: only resnet and timm_backbone load")
    if model_type == "detr" and c.get("auxiliary_loss"):
        # transformers' DetrDecoder then feeds every layer the LayerNorm-ed output of the previous
        # one (and norms the last one twice); the official DETR, and detrkit, norm only the outputs.
        warnings.warn(f"{folder / 'config.json'}: auxiliary_loss is true: transformers' DETR then normalises "
                      "between decoder layers, unlike the official DETR; detrkit computes the official outputs, "
                      "which differ from what transformers computes for this config", stacklevel=3)
    dilation = bool(c.get("dilation")) or bb.get("output_stride") == 16
    hints = {"nheads": heads.pop(), "dilation": dilation,
             "num_queries": c.get("two_stage_num_proposals") if c.get("two_stage") else c.get("num_queries")}
    return model_type, hints, _categories(c)


def _categories(c: dict) -> CategoryMap | None:
    id2label = c.get("id2label") or {}
    try:
        labels = sorted((int(k), str(v)) for k, v in id2label.items())
    except ValueError:
        return None
    if [k for k, _ in labels] != list(range(len(labels))):
        return None
    ids = c.get("detrkit_category_ids")  # written by export: the dataset's own category ids
    if not (isinstance(ids, list) and len(ids) == len(labels)):
        ids = [k for k, _ in labels]
    return CategoryMap(ids, [name for _, name in labels])


def read_folder(folder: Path) -> tuple[str, dict, CategoryMap | None, dict[str, Tensor], list[str]]:
    """-> (model_type, hints, categories, detrkit-named state dict, keys with no detrkit counterpart)."""
    model_type, hints, categories = read_config(folder)
    state, unknown = hf_keys.hf_to_detrkit(read_weights(folder), model_type)
    return model_type, hints, categories, state, unknown


# ---------------------------------------------------------------- export

def hf_config(model: nn.Module, cfg: Config, categories: CategoryMap, layout: str) -> dict:
    m, t = cfg.model, cfg.model.transformer
    deformable = m.arch == "deformable_detr"
    return_layers = model.backbone.return_layers
    if layout == "hf":
        layer_type, depths, hidden_sizes = _RESNETS[m.backbone.name]
        backbone = {"model_type": "resnet", "embedding_size": 64, "hidden_sizes": hidden_sizes, "depths": depths,
                    "layer_type": layer_type, "hidden_act": "relu", "downsample_in_first_stage": False,
                    "downsample_in_bottleneck": False,
                    "out_features": [f"stage{name[-1]}" for name in return_layers]}
    else:
        backbone = {"model_type": "timm_backbone", "backbone": m.backbone.name, "num_channels": 3,
                    "features_only": True, "use_pretrained_backbone": False,
                    "out_indices": [int(name[-1]) for name in return_layers] if deformable else [1, 2, 3, 4]}
        if m.backbone.dilation:
            backbone["output_stride"] = 16
    config = {
        "architectures": [MODEL_TYPES[m.arch]], "model_type": m.arch,
        "backbone_config": backbone, "use_timm_backbone": False, "use_pretrained_backbone": False,
        "dilation": m.backbone.dilation, "d_model": t.d_model,
        "encoder_layers": t.num_encoder_layers, "decoder_layers": t.num_decoder_layers,
        "encoder_ffn_dim": t.dim_feedforward, "decoder_ffn_dim": t.dim_feedforward,
        "encoder_attention_heads": t.nheads, "decoder_attention_heads": t.nheads,
        "num_queries": m.num_queries, "position_embedding_type": m.position_embedding,
        "activation_function": "relu", "dropout": t.dropout, "auxiliary_loss": False,
        "id2label": {str(i): name for i, name in enumerate(categories.names)},
        "label2id": {name: i for i, name in enumerate(categories.names)},
        "detrkit_category_ids": list(categories.ids),
    }
    if deformable:
        config.update({"num_feature_levels": m.num_feature_levels, "encoder_n_points": m.enc_n_points,
                       "decoder_n_points": m.dec_n_points, "with_box_refine": m.with_box_refine,
                       "two_stage": m.two_stage, "two_stage_num_proposals": m.num_queries,
                       # every head is written out, so nothing needs tying (transformers 5 would
                       # otherwise tie the refinement model's class heads to class_embed.0)
                       "tie_word_embeddings": False})
    return config


def check_exportable(cfg: Config) -> None:
    m = cfg.model
    if m.arch == "detr" and uses_focal_loss(cfg):
        raise CheckpointError("export --format hf: DetrForObjectDetection has a softmax 'no object' class; "
                              "this DETR was trained with the focal loss")
    if m.arch == "deformable_detr" and not uses_focal_loss(cfg):
        raise CheckpointError("export --format hf: DeformableDetrForObjectDetection scores classes with sigmoids; "
                              "this Deformable DETR was trained with the softmax (ce) loss")
    if getattr(m, "recurrent_steps", 0):
        raise CheckpointError("export --format hf: a recurrent (looped single-layer) decoder has no transformers "
                              "counterpart")


def write_folder(out: Path, model: nn.Module, cfg: Config, categories: CategoryMap) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` as ``save_pretrained`` would."""
    from safetensors.torch import save_file
    check_exportable(cfg)
    layout = "timm" if cfg.model.backbone.dilation else "hf"
    state = hf_keys.detrkit_to_hf(model.state_dict(), cfg.model.arch, layout)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model, cfg, categories, layout), indent=2))
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out
