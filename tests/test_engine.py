"""Training loop: the learning-rate schedule, mixed precision, exact resumption, atomic checkpoints,
and the stop on a non-finite loss."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import detrkit
from detrkit import checkpoint, config, presets
from detrkit.data.coco import CategoryMap, CocoDetection, resolve_split
from detrkit.data.transforms import make_transforms
from detrkit.config import TrainConfig
from detrkit.engine import Run, compute_losses, lr_factor
from detrkit.errors import CheckpointError, TrainingError

from conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def datasets(root: Path, cfg, annotations: Path | None = None) -> tuple[CocoDetection, CocoDetection]:
    images, ann = resolve_split(root, "train")
    train = CocoDetection(images, annotations or ann, make_transforms(cfg.data, train=True))
    val = CocoDetection(*resolve_split(root, "val"), make_transforms(cfg.data, train=False))
    return train, val


def logged(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """metrics.jsonl as ({step: training record without the wall time}, [evaluation records])."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in records if "eval" not in r}
    return steps, [{k: v for k, v in r.items() if k != "time"} for r in records if "eval" in r]


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- learning-rate schedule

def test_lr_drops_at_its_epoch_after_the_warmup():
    cfg = TrainConfig(lr_drop=3, warmup_steps=4)
    assert [lr_factor(cfg, 0, step) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(cfg, 2, 100) == 1.0 and lr_factor(cfg, 3, 100) == pytest.approx(0.1)


# ---------------------------------------------------------------- resumption

@pytest.mark.parametrize("num_workers, ema_decay", [(0, 0.9), (1, 0.0)])
def test_resume_mid_epoch_continues_exactly(tiny_root, tiny_config, tmp_path, num_workers, ema_decay):
    # Dropout on and full augmentation (flips, random crops): every random stream must resume.
    # 8 images, batch 2: 4 steps per epoch, 8 in all; interruptions mid-epoch 0 and mid-epoch 1.
    # With an EMA, the evaluations (of the average) check that the average resumes too.
    cfg = tiny_config("train.epochs=2", "model.transformer.dropout=0.1", f"data.num_workers={num_workers}",
                      f"train.ema_decay={ema_decay}")
    train, val = datasets(tiny_root, cfg)

    whole = Run(cfg, train.categories, tmp_path / "whole", CPU)
    whole.train(train, val, log_every=1, echo=quiet)

    run_dir = tmp_path / "interrupted"
    stops = [3, 6] if num_workers == 0 else [3]
    for stop in stops + [None]:
        run = Run(cfg, train.categories, run_dir, CPU)
        if stop != stops[0]:
            run.restore(run_dir)
        run.train(train, val, log_every=1, stop_at_step=stop, echo=quiet)
        if stop is not None:
            assert (run.global_step, run.epoch) == (stop, stop // 4)

    expected, expected_evals = logged(tmp_path / "whole")
    got, got_evals = logged(run_dir)
    assert sorted(expected) == list(range(1, 9))
    assert sorted(got) == sorted(expected)
    for step in expected:  # the logged losses are exactly those of the run that was not interrupted
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, abs=1e-6, rel=0), (step, key)
    assert got_evals == expected_evals and len(expected_evals) == 2  # the evaluation after each epoch

    for mine, expected_model in ((run.model, whole.model), (run.inference_model, whole.inference_model)):
        final = mine.state_dict()
        for name, tensor in expected_model.state_dict().items():
            assert torch.equal(final[name], tensor), name
    a, b = whole.optimizer.state_dict()["state"], run.optimizer.state_dict()["state"]
    for idx in a:
        for key in a[idx]:
            assert torch.equal(torch.as_tensor(a[idx][key]), torch.as_tensor(b[idx][key])), (idx, key)


def test_resume_at_epoch_end_starts_next_epoch(tiny_root, tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=2")
    train, _ = datasets(tiny_root, cfg)
    run = Run(cfg, train.categories, tmp_path, CPU)
    run.train(train, None, log_every=1, stop_at_step=4, echo=quiet)  # the last step of epoch 0
    resumed = Run(cfg, train.categories, tmp_path, CPU)
    resumed.restore(tmp_path)
    resumed.train(train, None, log_every=1, echo=quiet)
    steps, _ = logged(tmp_path)
    assert sorted(steps) == list(range(1, 9))
    assert [steps[s]["epoch"] for s in range(1, 9)] == [0] * 4 + [1] * 4
    assert (resumed.epoch, resumed.global_step) == (2, 8)


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained_run(tiny_root, tiny_config, tmp_path_factory) -> Path:
    """A run folder after 2 steps (an interrupted run: checkpoint, no evaluation). Treat as read-only."""
    cfg = tiny_config()
    train, _ = datasets(tiny_root, cfg)
    run_dir = tmp_path_factory.mktemp("run")
    Run(cfg, train.categories, run_dir, CPU).train(train, None, stop_at_step=2, echo=quiet)
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_latest_names_a_complete_checkpoint(trained_run):
    root = trained_run / "checkpoints"
    name = (root / "latest").read_text().strip()
    assert name == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", name]  # no temporary files left behind
    assert sorted(p.name for p in (root / name).iterdir()) == sorted(
        [checkpoint.CONFIG_FILE, checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.STATE_FILE])
    assert checkpoint.latest_checkpoint(trained_run) == root / name
    assert checkpoint.latest_checkpoint(root) == root / name
    assert checkpoint.latest_checkpoint(root / name) == root / name
    state = json.loads((root / name / checkpoint.STATE_FILE).read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)


def test_leftover_temporary_folder_is_ignored(trained_run, tiny_root, tiny_config, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    # What a crash in the middle of writing step 3 leaves: a temporary folder, half written.
    crashed = root / ".step_00000003.tmpk2j4"
    crashed.mkdir()
    (crashed / checkpoint.CONFIG_FILE).write_text('{"format": "detr')
    (crashed / checkpoint.MODEL_FILE).write_bytes(b"\x00" * 10)
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_00000002"
    detrkit.load(run_dir, "cpu")
    cfg = tiny_config()
    train, _ = datasets(tiny_root, cfg)
    run = Run(cfg, train.categories, run_dir, CPU)
    run.restore(run_dir)
    assert run.global_step == 2
    run.train(train, None, stop_at_step=3, echo=quiet)
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_00000003"


def test_failed_save_leaves_previous_checkpoint_in_place(trained_run, tiny_root, tiny_config, tmp_path, monkeypatch):
    run_dir = copy_run(trained_run, tmp_path / "run")
    cfg = tiny_config()
    train, _ = datasets(tiny_root, cfg)
    run = Run(cfg, train.categories, run_dir, CPU)
    run.restore(run_dir)
    run.global_step = 3
    calls = []

    def disk_full(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the model is written, the optimizer is not
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        run.save()
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_00000002"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_give_checkpoint_error_naming_the_file(trained_run, tiny_root, tiny_config, tmp_path, damage):
    run_dir = copy_run(trained_run, tmp_path / "run")
    file = run_dir / "checkpoints" / "step_00000002" / checkpoint.MODEL_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=str(file)):
        detrkit.load(run_dir, "cpu")
    cfg = tiny_config()
    run = Run(cfg, datasets(tiny_root, cfg)[0].categories, run_dir, CPU)
    with pytest.raises(CheckpointError, match=str(file)):
        run.restore(run_dir)


def test_latest_naming_a_missing_folder(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="latest.*step_00000002.*missing"):
        checkpoint.latest_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="no detrkit checkpoint"):
        checkpoint.latest_checkpoint(tmp_path / "elsewhere")


def test_resume_refuses_what_it_cannot_continue(trained_run, tiny_root, tiny_config, tmp_path):
    cfg = tiny_config()
    categories = datasets(tiny_root, cfg)[0].categories
    run = Run(cfg, categories, tmp_path / "new", CPU)
    model_only = checkpoint.save_model(tmp_path / "model", run.model, cfg.to_dict(), categories.to_dict())
    with pytest.raises(CheckpointError, match=f"{model_only / checkpoint.STATE_FILE}: not found"):
        run.restore(model_only)
    renamed = CategoryMap(categories.ids, categories.names[::-1])  # same count, other names
    with pytest.raises(CheckpointError, match="trained on categories"):
        Run(cfg, renamed, tmp_path / "other", CPU).restore(trained_run)
    run.restore(trained_run)
    assert run.global_step == 2


# ---------------------------------------------------------------- non-finite losses

def parameters_and_optimizer(run: Run) -> dict[str, torch.Tensor]:
    state = {f"param.{k}": v.detach().clone() for k, v in run.model.named_parameters()}
    for idx, entries in run.optimizer.state_dict()["state"].items():
        state.update({f"opt.{idx}.{k}": torch.as_tensor(v).clone() for k, v in entries.items()})
    return state


def poison(run: Run, key: str):
    """Make the model's ``key`` output (and its auxiliary ones) NaN from now on."""
    def hook(module, inputs, outputs):
        outputs[key] = outputs[key] * float("nan")
        for aux in outputs.get("aux_outputs", []):
            aux[key] = aux[key] * float("nan")
        return outputs
    return run.model.register_forward_hook(hook)


def empty_annotations(root: Path, dest: Path) -> Path:
    """The train split's annotation file with every box removed."""
    data = json.loads((root / "train" / "annotations.json").read_text())
    dest.write_text(json.dumps({**data, "annotations": []}))
    return dest


@pytest.mark.parametrize("case", ["loss", "matching"])
def test_nonfinite_loss_stops_before_the_weights_change(tiny_root, tiny_config, tmp_path, case):
    cfg = tiny_config("train.epochs=2")
    if case == "loss":  # no objects: the matcher has nothing to match, the class loss turns NaN
        train, _ = datasets(tiny_root, cfg, empty_annotations(tiny_root, tmp_path / "empty.json"))
    else:  # NaN boxes make the matching cost NaN before any loss is computed
        train, _ = datasets(tiny_root, cfg)
    run = Run(cfg, train.categories, tmp_path / "run", CPU)
    run.train(train, None, stop_at_step=1, echo=quiet)  # the optimizer has state now
    before = parameters_and_optimizer(run)
    poison(run, "pred_logits" if case == "loss" else "pred_boxes")
    with pytest.raises(TrainingError) as info:
        run.train(train, None, echo=quiet)
    message = str(info.value)
    sampler_ids = [train.image_ids[i] for i in _second_batch(cfg, len(train))]
    assert str(sampler_ids) in message  # the images of the batch, by their dataset ids
    if case == "loss":
        assert "non-finite loss (loss_ce for images" in message
    else:
        assert "pred_boxes contain NaN" in message
    assert "unchanged" in message
    after = parameters_and_optimizer(run)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert run.global_step == 1
    assert checkpoint.latest_checkpoint(run.run_dir).name == "step_00000001"


def _second_batch(cfg, size: int) -> list[int]:
    from detrkit.engine import EpochSampler
    sampler = EpochSampler(size, cfg.train.seed)
    return sampler.shard()[cfg.train.batch_size: 2 * cfg.train.batch_size]


def test_overflowing_total_is_reported_as_such():
    def criterion(outputs, targets):
        big = torch.tensor(3e38)
        return {"loss": big * 2, "loss_ce": big, "loss_bbox": torch.tensor(0.5)}
    targets = [{"image_id": torch.tensor(7)}, {"image_id": torch.tensor(9)}]
    with pytest.raises(TrainingError, match=r"total.*images \[7, 9\]"):
        compute_losses(criterion, {"pred_boxes": torch.zeros(2, 1, 4)}, targets)


# ---------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_cpu_amp_trains_in_bfloat16_where_the_cpu_has_it(tiny_root, tmp_path, monkeypatch, bf16_kernels):
    from detrkit import engine
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: bf16_kernels)
    cfg = config.apply_overrides(presets.deformable_detr_small_two_stage(),
                                 TINY_OVERRIDES + ["train.amp=true", "train.epochs=2"])
    train, val = datasets(tiny_root, cfg)
    run = Run(cfg, train.categories, tmp_path / "run", CPU)
    seen, losses = [], []
    run.model.transformer.decoder.layers[0].linear1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    compute = engine.compute_losses
    monkeypatch.setattr(engine, "compute_losses", lambda *a: losses.append(compute(*a)) or losses[-1])
    stats = run.train(train, val, echo=quiet)
    assert set(seen) == {torch.bfloat16 if bf16_kernels else torch.float32}  # training and evaluation
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for step in losses for v in step.values())
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # the weights stay float32
    assert 0 <= stats["AP"] <= 1
