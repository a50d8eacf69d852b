"""Shared data fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detrkit.data.synth import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (train/ and val/), generated once per test session. Treat as read-only."""
    return generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=8, image_size=96, seed=0)


# ---------------------------------------------------------------- tiny training runs (engine, CLI, DDP, overfit)

# A DETR small enough to train a few steps in about a second on one CPU core: ResNet-18, d_model 64,
# one encoder and one decoder layer, 64-72 px images. Usable with config.apply_overrides and with --set.
TINY_OVERRIDES = [
    "model.transformer.d_model=64", "model.transformer.nheads=4", "model.transformer.dim_feedforward=128",
    "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=1", "model.num_queries=10",
    "data.train_scales=[64,72]", "data.val_scale=64", "data.max_size=96",
    "data.crop_scales=[56,64]", "data.crop_size=[40,56]", "data.num_workers=0",
    "train.batch_size=2", "train.epochs=1",
]


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: ``tiny_config("train.lr=1e-3", ...)`` is detr_small with TINY_OVERRIDES and these on top."""
    from detrkit import config, presets

    def make(*overrides: str):
        return config.apply_overrides(presets.detr_small(), TINY_OVERRIDES + list(overrides))
    return make


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train and 4 val synthetic images of at most 64 px. Treat as read-only."""
    return generate(tmp_path_factory.mktemp("tiny"), num_train=8, num_val=4, image_size=64, seed=1)


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """TINY_OVERRIDES, as ``--set`` arguments of ``detrkit train``."""
    return [arg for item in TINY_OVERRIDES for arg in ("--set", item)]


@pytest.fixture(scope="session")
def untrained_checkpoint():
    """A factory: ``untrained_checkpoint(preset, synth_root, out, max_size)`` saves an untrained
    1+2-layer model (d_model 32, 10 queries) seeing images at 64 px, and returns its folder."""
    from detrkit.build import build_model
    from detrkit.checkpoint import save_model
    from detrkit.config import TransformerConfig
    from detrkit.data.coco import CocoDetection, resolve_split

    def make(preset, root: Path, out: Path, max_size: int = 96) -> Path:
        torch.manual_seed(0)
        categories = CocoDetection(*resolve_split(root, "val")).categories
        cfg = preset()
        cfg.model.num_classes, cfg.model.num_queries = len(categories), 10
        cfg.model.transformer = TransformerConfig(d_model=32, nheads=4, num_encoder_layers=1,
                                                  num_decoder_layers=2, dim_feedforward=64, dropout=0.0)
        cfg.data.val_scale, cfg.data.max_size = 64, max_size
        return save_model(out, build_model(cfg).eval(), cfg.to_dict(), categories.to_dict())
    return make
