"""The moving average of the weights: its formula, the backbone's folded batch norms following it,
and where a run saves it (model.safetensors, the model users load) and its trained weights."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import detrkit
from detrkit import checkpoint
from detrkit.build import build_model
from detrkit.config import ConfigError
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.transforms import make_transforms
from detrkit.ema import EMA
from detrkit.engine import Run

CPU = torch.device("cpu")


def test_update_is_the_moving_average_with_its_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 2))
    ema = EMA(model, decay=0.9)
    # float64 reference: a_t = d_t a_{t-1} + (1 - d_t) w_t, d_t = min(0.9, (1 + t) / (10 + t))
    expected = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 7, 7))  # moves the batch norm's statistics and its count
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v.double()
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10_000) == 0.9
    averaged = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].double(), v, rtol=1e-5, atol=1e-6)
    assert averaged["1.num_batches_tracked"] == 39  # integer buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_rejects_a_decay_outside_zero_one():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        EMA(nn.Linear(2, 2), 1.0)


def test_averaged_backbone_refolds_its_batch_norms_after_each_update(tiny_config):
    # The averaged model's batch norms fold into its convolutions (backbone._prepared), cached
    # until a weight moves: after an update it must compute what a fresh copy of it computes.
    cfg = tiny_config()
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = EMA(model, decay=0.5)
    images, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ema.module(images, mask)  # fills the fold cache
        for p in model.parameters():
            p.mul_(1.5)
        model.train()(images, mask)  # the batch norms' running statistics move too
        ema.update(model, step=100)
        fresh = copy.deepcopy(model).eval()
        fresh.load_state_dict(ema.module.state_dict())
        got, expected = ema.module(images, mask), fresh(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


@pytest.fixture(scope="module")
def ema_run(tiny_root, tiny_config, tmp_path_factory):
    """A run with an EMA stopped after 3 steps: (run, run folder)."""
    cfg = tiny_config("train.ema_decay=0.9")
    train = CocoDetection(*resolve_split(tiny_root, "train"), make_transforms(cfg.data, train=True))
    run_dir = tmp_path_factory.mktemp("ema_run")
    run = Run(cfg, train.categories, run_dir, CPU)
    run.train(train, None, stop_at_step=3, echo=lambda s: None)
    return run, run_dir


def test_checkpoint_holds_the_average_as_its_model_and_the_trained_weights_beside(ema_run):
    run, run_dir = ema_run
    ckpt = checkpoint.latest_checkpoint(run_dir)
    averaged = checkpoint.read_tensors(ckpt / checkpoint.MODEL_FILE)
    trained = checkpoint.read_tensors(ckpt / checkpoint.LIVE_MODEL_FILE)
    name = "class_embed.weight"
    assert not torch.equal(averaged[name], trained[name])
    assert torch.equal(averaged[name], run.ema.module.state_dict()[name])
    assert torch.equal(trained[name], run.model.state_dict()[name])
    loaded = detrkit.load(run_dir, "cpu")  # what eval, predict and export read
    assert torch.equal(loaded.model.state_dict()[name], averaged[name])


def test_resume_restores_both_and_starts_an_average_from_a_checkpoint_without_one(ema_run, tiny_config, tmp_path):
    run, run_dir = ema_run
    resumed = Run(run.cfg, run.categories, tmp_path / "resumed", CPU)
    resumed.restore(run_dir)
    for mine, theirs in ((resumed.model, run.model), (resumed.ema.module, run.ema.module)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), k
    without = Run(tiny_config(), run.categories, tmp_path / "without", CPU)
    without.restore(run_dir)  # a run that drops the EMA trains on from the trained weights
    for k, v in run.model.state_dict().items():
        assert torch.equal(without.model.state_dict()[k], v), k
    plain = shutil.copytree(checkpoint.latest_checkpoint(run_dir), tmp_path / "plain")
    (plain / checkpoint.LIVE_MODEL_FILE).unlink()  # as a run without an EMA saves it
    started = Run(run.cfg, run.categories, tmp_path / "started", CPU)
    started.restore(plain)
    for k, v in started.model.state_dict().items():
        assert torch.equal(started.ema.module.state_dict()[k], v), k
