"""Weights interop: HuggingFace folders, official checkpoints, the native format, safe loading.

HuggingFace models are built offline from configs with random weights (transformers is a test
dependency; nothing is downloaded), saved, loaded in detrkit and compared on a padded batch of two
image sizes; then exported back and loaded by transformers. Official checkpoints are state dicts
built in the official layout (``backbone.0.body.*``); see ``detrkit/interop/official.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import detrkit
from detrkit import checkpoint
from detrkit.build import build_model
from detrkit.cli import main as cli
from detrkit.config import TransformerConfig
from detrkit.data.coco import CategoryMap
from detrkit.errors import CheckpointError
from detrkit.interop import export
from detrkit.presets import preset

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small ops: one thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every float tensor (BN statistics included) fresh random values of a useful scale, so
    that attention is not uniform and no mapping error hides behind a constant, zero or shared
    initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:  # linear, conv, embedding: about unit-variance outputs
                t.copy_(noise / t[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norm scales
                t.copy_(1 + 0.2 * noise)
            else:
                t.copy_(0.2 * noise)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, 96x128 and 48x64, padded bottom/right to 96x128 (padding reaches the stride-32
    feature map). mask: True = padding."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 48:], mask[1, :, 64:] = True, True
    return images.masked_fill(mask[:, None], 0.0), mask


def _max_diff(a: dict, b: dict) -> float:
    return max((a["pred_logits"] - b["pred_logits"]).abs().max().item(),
               (a["pred_boxes"] - b["pred_boxes"]).abs().max().item())


@torch.no_grad()
def _hf_outputs(model, images: torch.Tensor, mask: torch.Tensor) -> dict:
    out = model(pixel_values=images, pixel_mask=(~mask).long())
    outputs = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if getattr(model.config, "with_box_refine", False):
        # refining, each decoder layer's boxes are the reference points it hands on: (B, layers, N, 4)
        outputs["layer_boxes"] = out.intermediate_reference_points
    return outputs


# ---------------------------------------------------------------- HuggingFace

HF_VARIANTS = {
    "detr": ("detr", {}),
    "detr_learned_pos": ("detr", {"position_embedding_type": "learned"}),
    "deformable": ("deformable_detr", {}),
    "deformable_single_scale": ("deformable_detr", {"num_feature_levels": 1}),
    "deformable_refine": ("deformable_detr", {"with_box_refine": True}),
    "deformable_two_stage": ("deformable_detr", {"with_box_refine": True, "two_stage": True}),
}


def _hf_model(model_type: str, **kwargs):
    transformers = pytest.importorskip("transformers")
    single = model_type == "detr" or kwargs.get("num_feature_levels", 4) == 1
    backbone = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        out_features=["stage4"] if single else ["stage2", "stage3", "stage4"])
    common = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=64,
                  encoder_layers=1, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  encoder_attention_heads=8, decoder_attention_heads=8, num_queries=10,
                  id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    if model_type == "detr":
        model = transformers.DetrForObjectDetection(transformers.DetrConfig(**common, **kwargs))
    else:
        model = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(
            **common, two_stage_num_proposals=10, encoder_n_points=2, decoder_n_points=2, **kwargs))
    _randomize(model)
    return model.eval()


@pytest.fixture(scope="module", params=list(HF_VARIANTS))
def hf_saved(request, tmp_path_factory):
    """(HuggingFace model, its save_pretrained folder, its outputs on the padded batch)."""
    model_type, kwargs = HF_VARIANTS[request.param]
    model = _hf_model(model_type, **kwargs)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(folder)
    return model, folder, _hf_outputs(model, *_batch())


@torch.no_grad()
def test_hf_folder_loads_with_the_same_outputs(hf_saved):
    model, folder, reference = hf_saved
    images, mask = _batch()
    detector = detrkit.load(folder, "cpu")
    out = detector(images, mask)
    assert out["pred_logits"].shape == reference["pred_logits"].shape
    assert _max_diff(out, reference) < TOL
    # the comparison is sensitive to padding: ignoring the mask changes the outputs
    assert _max_diff(detector(images, torch.zeros_like(mask)), reference) > 1e-3
    m = detector.cfg.model
    assert (m.num_queries, m.transformer.d_model, m.transformer.num_decoder_layers) == (10, 64, 2)
    assert detector.categories.names == ["cat", "dog", "bird"]
    if m.arch == "deformable_detr":
        c = model.config
        assert (m.with_box_refine, m.two_stage, m.num_feature_levels, m.dec_n_points) == \
            (c.with_box_refine, c.two_stage, c.num_feature_levels, 2)
    if m.with_box_refine:  # every decoder layer's boxes, not only the last one's
        layer_boxes = torch.stack([aux["pred_boxes"] for aux in out["aux_outputs"]] + [out["pred_boxes"]], 1)
        assert (layer_boxes - reference["layer_boxes"]).abs().max() < TOL


@torch.no_grad()
def test_hf_round_trip_through_convert_and_export(hf_saved, tmp_path):
    model, folder, reference = hf_saved
    assert cli(["convert", str(folder), "--out", str(tmp_path / "native")]) == 0
    assert cli(["export", "--format", "hf", str(tmp_path / "native"), "--out", str(tmp_path / "hf")]) == 0
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    assert _max_diff(_hf_outputs(again, *_batch()), reference) < TOL
    assert again.config.id2label == model.config.id2label


@torch.no_grad()
def test_hf_other_layouts(tmp_path):
    """The same weights as transformers 5 names them in memory (``model.backbone.model``, ``o_proj``,
    ``mlp.fc1``), and with timm's backbone (torchvision names; ``use_timm_backbone``) in a
    ``pytorch_model.bin``. The timm folder is written here by renaming, since timm needs torchvision,
    which is not installed."""
    from safetensors.torch import load_file, save_file

    from detrkit.interop.hf_keys import BACKBONE, _HF_RESNET, _sub_first
    model = _hf_model("detr")
    images, mask = _batch()
    reference = _hf_outputs(model, images, mask)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    (tmp_path / "memory").mkdir()
    memory = model.state_dict()
    assert "model.backbone.model.embedder.embedder.convolution.weight" in memory
    assert "model.encoder.layers.0.mlp.fc1.weight" in memory
    save_file({k: v.contiguous() for k, v in memory.items()}, str(tmp_path / "memory" / "model.safetensors"))
    (tmp_path / "memory" / "config.json").write_text(json.dumps(config))
    assert _max_diff(detrkit.load(tmp_path / "memory", "cpu")(images, mask), reference) < TOL
    # transformers' DETR normalises between decoder layers when auxiliary_loss is set: said, not matched
    (tmp_path / "memory" / "config.json").write_text(json.dumps({**config, "auxiliary_loss": True}))
    with pytest.warns(UserWarning, match="auxiliary_loss"):
        detrkit.load(tmp_path / "memory", "cpu")

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    timm = {(BACKBONE + _sub_first(k[len(BACKBONE):], _HF_RESNET)) if k.startswith(BACKBONE) else k: v
            for k, v in state.items()}
    assert f"{BACKBONE}layer4.1.conv2.weight" in timm and f"{BACKBONE}layer2.0.downsample.1.running_var" in timm
    config["backbone_config"] = {"model_type": "timm_backbone", "backbone": "resnet18", "features_only": True,
                                 "use_pretrained_backbone": False, "out_indices": [1, 2, 3, 4]}
    (tmp_path / "timm").mkdir()
    torch.save(timm, tmp_path / "timm" / "pytorch_model.bin")
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    assert _max_diff(detrkit.load(tmp_path / "timm", "cpu")(images, mask), reference) < TOL
    # DC5: timm's output_stride 16 is read as a dilated last stage
    config["backbone_config"]["output_stride"], config["dilation"] = 16, True
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    assert detrkit.load(tmp_path / "timm", "cpu").cfg.model.backbone.dilation


# ---------------------------------------------------------------- detrkit models -> transformers

_MODELS: dict = {}
CATEGORIES = CategoryMap([1, 3, 7], ["cat", "dog", "bird"])


def _model(name: str, **model_fields):
    """A tiny detrkit model from preset ``name`` with random weights, built once per session."""
    key = (name, repr(sorted(model_fields.items())))
    if key not in _MODELS:
        cfg = preset(name)
        cfg.model.num_classes, cfg.model.num_queries = 3, 10
        cfg.model.transformer = TransformerConfig(d_model=64, nheads=8, num_encoder_layers=1,
                                                  num_decoder_layers=2, dim_feedforward=128, dropout=0.0)
        for field, value in model_fields.items():
            setattr(cfg.model, field, value)
        if cfg.model.arch == "deformable_detr":
            cfg.model.enc_n_points = cfg.model.dec_n_points = 2
        model = build_model(cfg)
        _randomize(model)
        _MODELS[key] = (model.eval(), cfg)
    return _MODELS[key]


def _native(folder: Path, name: str, **model_fields) -> tuple[torch.nn.Module, Path]:
    """The model of ``_model`` and its native folder (config.json + model.safetensors)."""
    model, cfg = _model(name, **model_fields)
    return model, checkpoint.save_model(folder / name, model, cfg.to_dict(), CATEGORIES.to_dict())


@pytest.mark.parametrize("name, fields", [
    ("detr_small", {"recollection": "sqr"}),  # trained with SQR: a training method, the same model after
    ("deformable_detr_small_refine", {}),  # per-layer heads, all different (transformers 5 would tie them)
])
@torch.no_grad()
def test_detrkit_model_exports_to_transformers(tmp_path, name, fields):
    transformers = pytest.importorskip("transformers")
    model, folder = _native(tmp_path, name, **fields)
    assert cli(["export", "--format", "hf", str(folder), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_class = getattr(transformers, config["architectures"][0])
    exported = hf_class.from_pretrained(tmp_path / "hf").eval()
    images, mask = _batch()
    assert _max_diff(_hf_outputs(exported, images, mask), model(images, mask)) < TOL
    back = detrkit.load(tmp_path / "hf", "cpu")  # category ids survive the trip
    assert (back.categories.ids, back.categories.names) == ([1, 3, 7], ["cat", "dog", "bird"])


@torch.no_grad()
def test_dc5_exports_with_timm_names(tmp_path):
    """transformers' ResNet cannot dilate, so a DC5 model is written with a timm backbone."""
    model, folder = _native(tmp_path, "detr_small", backbone=_dc5())
    export(folder, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == "timm_backbone" and config["dilation"]
    back = detrkit.load(tmp_path / "hf", "cpu")
    assert back.cfg.model.backbone.dilation
    images, mask = _batch()
    assert _max_diff(back(images, mask), model(images, mask)) < TOL


def _dc5():
    from detrkit.config import BackboneConfig
    return BackboneConfig(name="resnet18", dilation=True, norm="frozen_bn")


# ---------------------------------------------------------------- official checkpoints

def _official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout, by the official files' module structure: the
    backbone inside ``Joiner`` (an nn.Sequential of body and position encoding); all else as named."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("backbone.body.", "backbone.0.body.", 1).replace("position_encoding.", "backbone.1.", 1)
        out[key] = value.clone()
    return out


OFFICIAL_KEYS = {  # names as the official model definitions produce them
    "detr_small": ["backbone.0.body.layer1.0.conv1.weight", "backbone.0.body.bn1.running_var",
                   "transformer.encoder.layers.0.self_attn.in_proj_weight", "transformer.encoder.layers.0.norm2.bias",
                   "transformer.decoder.layers.1.multihead_attn.out_proj.weight", "transformer.decoder.norm.weight",
                   "query_embed.weight", "input_proj.weight", "class_embed.weight", "bbox_embed.layers.2.bias"],
    "deformable_detr_small": ["transformer.level_embed", "transformer.reference_points.weight",
                              "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
                              "transformer.decoder.layers.0.cross_attn.value_proj.weight",
                              "transformer.decoder.layers.0.self_attn.in_proj_bias", "input_proj.3.1.weight",
                              "class_embed.1.weight", "bbox_embed.1.layers.0.weight"],
    "deformable_detr_small_refine": ["transformer.decoder.bbox_embed.1.layers.2.bias", "bbox_embed.1.layers.2.bias"],
    "deformable_detr_small_two_stage": ["transformer.decoder.class_embed.2.weight", "transformer.enc_output.weight",
                                        "transformer.enc_output_norm.weight", "transformer.pos_trans_norm.bias"],
}


@pytest.mark.parametrize("name", list(OFFICIAL_KEYS))
@torch.no_grad()
def test_official_round_trip(tmp_path, name):
    model, _ = _model(name)
    state = _official(model)
    assert set(OFFICIAL_KEYS[name]) <= set(state)
    args = argparse.Namespace(nheads=8, dilation=False, num_queries=10, lr=2e-4, output_dir="out", epochs=50)
    torch.save({"model": state, "args": args, "epoch": 49}, tmp_path / "checkpoint.pth")
    detector = detrkit.load(tmp_path / "checkpoint.pth", "cpu")
    images, mask = _batch()
    assert _max_diff(detector(images, mask), model(images, mask)) < TOL  # frozen BN here, BatchNorm2d there
    m = detector.cfg.model
    assert (m.arch, m.num_classes, m.num_queries, m.transformer.num_decoder_layers, m.backbone.name) == \
        ("detr" if name == "detr_small" else "deformable_detr", 3, 10, 2, "resnet18")
    if m.arch == "deformable_detr":
        assert (m.with_box_refine, m.two_stage) == (name.endswith(("refine", "two_stage")), name.endswith("two_stage"))
    assert cli(["export", "--format", "official", str(tmp_path / "checkpoint.pth"),
                "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_official_hints(tmp_path):
    """What weights do not show: DC5 from the file name, nheads and two-stage queries as hints."""
    model, _ = _model("deformable_detr_small_two_stage")
    torch.save({"model": _official(model)}, tmp_path / "deformable-r18-dc5.pth")
    m = detrkit.load(tmp_path / "deformable-r18-dc5.pth", "cpu", nheads=4, num_queries=7).cfg.model
    assert (m.backbone.dilation, m.transformer.nheads, m.num_queries, m.dec_n_points) == (True, 4, 7, 4)
    detr, _ = _model("detr_small")
    torch.save(_official(detr), tmp_path / "bare.pth")  # a bare state dict, no {"model": ...}
    detector = detrkit.load(tmp_path / "bare.pth", "cpu")
    assert detector.categories.ids == [0, 1, 2] and not detector.cfg.model.backbone.dilation


def test_coco_checkpoints_get_coco_names(tmp_path):
    cfg = preset("detr_small")
    cfg.model.num_classes = 91
    cfg.model.transformer = TransformerConfig(d_model=64, nheads=8, num_encoder_layers=1, num_decoder_layers=1,
                                              dim_feedforward=64)
    torch.save({"model": _official(build_model(cfg))}, tmp_path / "detr.pth")
    categories = detrkit.load(tmp_path / "detr.pth", "cpu").categories
    assert categories.names[1] == "person" and categories.to_id(90) == 90


def test_commands_accept_foreign_checkpoints(tmp_path):
    from PIL import Image
    model, _ = _model("detr_small")
    torch.save({"model": _official(model)}, tmp_path / "detr.pth")
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "image.png")
    assert cli(["predict", "--checkpoint", str(tmp_path / "detr.pth"), str(tmp_path / "image.png"),
                "--out", str(tmp_path / "out"), "--threshold", "0"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 10 and {r["category_name"] for r in results} <= {"class_0", "class_1", "class_2"}


# ---------------------------------------------------------------- errors and safety

def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    model, _ = _model("detr_small")
    state = _official(model)
    del state["transformer.decoder.layers.1.norm3.weight"]
    state["transformer.decoder.layers.1.extra.weight"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        detrkit.load(tmp_path / "bad.pth", "cpu")
    assert "missing keys (1): transformer.decoder.layers.1.norm3.weight" in str(err.value)
    assert "unexpected keys (1): transformer.decoder.layers.1.extra.weight" in str(err.value)


def test_truncated_files_give_clear_errors(tmp_path):
    model, native = _native(tmp_path, "detr_small")
    torch.save({"model": _official(model)}, tmp_path / "detr.pth")
    data = (tmp_path / "detr.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        detrkit.load(tmp_path / "cut.pth", "cpu")
    hf = tmp_path / "hf"
    export(native, hf, "hf")
    weights = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        detrkit.load(hf, "cpu")
    (hf / "config.json").write_text('{"model_type": "detr", ')
    with pytest.raises(CheckpointError):
        detrkit.load(hf, "cpu")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    _Payload.target = str(tmp_path / "pwned")
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        detrkit.load(tmp_path / "evil.pth", "cpu")
    assert not (tmp_path / "pwned").exists()


def test_train_accepts_backbone_weights():
    from detrkit.cli import build_parser
    args = build_parser().parse_args(["train", "--out", "r", "--backbone-weights", "resnet50.pth"])
    assert args.backbone_weights == "resnet50.pth"
