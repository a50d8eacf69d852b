"""Configuration: presets, YAML files and --set overrides map onto the same dataclasses."""
import pytest

from detrkit import config, presets
from detrkit.config import Config, ConfigError


def test_every_preset_builds_a_config():
    for name in presets.PRESETS:
        assert isinstance(presets.preset(name), Config)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        presets.preset("nope")


def test_paper_presets_hold_the_paper_values():
    detr = presets.preset("detr_r50")
    assert (detr.model.num_queries, detr.model.transformer.d_model, detr.model.transformer.num_encoder_layers) == (100, 256, 6)
    assert (detr.train.lr, detr.train.lr_backbone, detr.train.weight_decay, detr.train.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
    assert (detr.matcher.cost_class, detr.matcher.cost_bbox, detr.matcher.cost_giou, detr.loss.eos_coef) == (1, 5, 2, 0.1)
    assert detr.model.backbone.frozen == ["stem", "layer1"] and detr.model.backbone.norm == "frozen_bn"
    assert presets.preset("detr_r50_dc5").model.backbone.dilation
    deform = presets.preset("deformable_detr_r50_two_stage")
    assert (deform.model.num_queries, deform.model.transformer.dim_feedforward, deform.loss.class_loss) == (300, 1024, "focal")
    assert deform.model.with_box_refine and deform.model.two_stage and deform.loss.ce_coef == 2.0


def test_yaml_applies_on_a_preset_and_overrides_apply_last(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: detr_small\ntrain:\n  lr: 3.0e-4\n  epochs: 7\ndata:\n  train_scales: [128, 160]\n")
    cfg = config.load_yaml(f)
    assert cfg.model.backbone.name == "resnet18" and cfg.train.lr == 3e-4 and cfg.train.epochs == 7
    assert cfg.data.train_scales == [128, 160]
    config.apply_overrides(cfg, ["train.lr=5e-4", "model.recollection=sqr", "train.amp=true",
                                 "data.train_scales=[96, 112]"])
    assert cfg.train.lr == 5e-4 and cfg.model.recollection == "sqr" and cfg.train.amp is True
    assert cfg.data.train_scales == [96, 112]
    # what the run saves reads back as the same config
    assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 1\n", r"run.yaml: unknown field 'train.lrr'"),
    ("train:\n  lr: fast\n", r"run.yaml: train.lr: expected a number"),
    ("train: 3\n", r"run.yaml: 'train' is a section"),
    ("train:\n  epochs: 2.5\n", r"train.epochs: expected an integer"),
    ("train:\n  amp: 1\n", r"train.amp: expected true/false"),
    ("train: [\n", r"run.yaml: cannot read config"),
    ("- 1\n", r"run.yaml: a config file must be a mapping"),
])
def test_bad_config_files_name_the_file_and_the_field(tmp_path, text, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load_yaml(f)


def test_bad_overrides_name_the_field():
    cfg = presets.preset("detr_small")
    with pytest.raises(ConfigError, match="--set: unknown field 'model.backbone.nme'"):
        config.apply_overrides(cfg, ["model.backbone.nme=resnet50"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config.apply_overrides(cfg, ["train.lr"])
