"""The ``detrkit`` command end to end on a small synthetic set, and its one-line errors."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from detrkit import evaluation
from detrkit.cli import main
from detrkit.evaluation import STAT_NAMES

DETRKIT = Path(sys.executable).parent / "detrkit"  # the console script


def table_numbers(text: str) -> list[float]:
    """The 12 numbers of a printed COCO table, in order."""
    return [float(v) for v in re.findall(r"^ Average (?:Precision|Recall) .* = (-?\d+\.\d+)$", text, re.M)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides) -> tuple[Path, Path, str]:
    """``detrkit synth`` then one epoch of ``detrkit train``: (dataset, run folder, train's stdout).
    Treat as read-only."""
    tmp = tmp_path_factory.mktemp("cli")
    data, run = tmp / "data", tmp / "run"
    assert main(["synth", "--out", str(data), "--num-train", "8", "--num-val", "4", "--size", "64",
                 "--seed", "3"]) == 0
    out = io.StringIO()  # module fixtures cannot use capsys
    with contextlib.redirect_stdout(out):
        code = main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *tiny_overrides])
    assert code == 0
    return data, run, out.getvalue()


def test_synth_and_check(trained, capsys):
    data, _, _ = trained
    assert main(["check", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.count("annotations:") == 2  # train and val
    assert "8 images" in out and "4 images" in out
    assert main(["check", str(data / "val")]) == 0
    assert "4 images" in capsys.readouterr().out


def test_train_writes_config_checkpoint_and_final_evaluation(trained):
    _, run, out = trained
    assert len(table_numbers(out)) == 12
    assert "num_queries: 10" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # 8 images, batch 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records if "eval" in r] == [(4, 1)]


def test_eval_checkpoint_and_its_predictions_agree(trained, tmp_path, capsys, monkeypatch):
    data, run, _ = trained
    results: list[dict] = []
    update = evaluation.CocoEvaluator.update

    def keep(self, batch_results):  # the results the checkpoint evaluation scores
        results.extend(batch_results)
        return update(self, batch_results)

    monkeypatch.setattr(evaluation.CocoEvaluator, "update", keep)
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "a.json").read_text())
    assert list(stats) == list(STAT_NAMES)
    assert table_numbers(printed) == [round(stats[k], 3) for k in STAT_NAMES]
    assert len(results) == 4 * 10  # 4 val images, 10 queries

    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["eval", "--predictions", str(tmp_path / "results.json"), "--data", str(data),
                 "--json", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out == printed
    assert json.loads((tmp_path / "b.json").read_text()) == stats

    # The console script: same numbers from a fresh process.
    done = subprocess.run([str(DETRKIT), "eval", "--predictions", str(tmp_path / "results.json"),
                           "--data", str(data)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed


def test_predict_writes_results_and_pictures(trained, tmp_path, capsys):
    data, run, _ = trained
    images = sorted((data / "val" / "images").iterdir())[:2]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run), *map(str, images), "--out", str(out), "--threshold", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["file_name"] for r in results} == set(map(str, images))
    assert len(results) == 2 * 10
    names = {1: "circle", 3: "square", 5: "triangle", 7: "cross"}  # synth's sparse ids
    assert all(names[r["category_id"]] == r["category_name"] for r in results)
    assert all(len(r["bbox"]) == 4 and 0 < r["score"] <= 1 for r in results)
    assert sorted(p.name for p in out.glob("*.png")) == [p.stem + ".png" for p in images]
    assert "wrote" in capsys.readouterr().out


def test_resume_continues_the_run(trained, tmp_path, capsys):
    data, trained_run, _ = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} at epoch 1, step 4" in out
    assert len(table_numbers(out)) == 12
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records if "eval" in r] == [(4, 1), (8, 2)]
    # Finished: resuming again trains no further step.
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--no-eval"]) == 0
    assert "at epoch 2, step 8" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"


# ---------------------------------------------------------------- bad input: exit 2, one line naming the culprit

def bad_bbox_dataset(root: Path, dest: Path) -> Path:
    shutil.copytree(root / "val", dest)
    data = json.loads((dest / "annotations.json").read_text())
    data["annotations"][1]["bbox"] = [3, 4, "wide", 10]
    (dest / "annotations.json").write_text(json.dumps(data))
    return dest


def corrupt_checkpoint(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    model = dest / "checkpoints" / "step_00000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    return model


def expect_error(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detrkit {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_dataset_folder(trained, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    expect_error(["train", "--data", missing, "--out", str(tmp_path / "run")], capsys, missing)
    expect_error(["check", missing], capsys, missing)
    expect_error(["eval", "--checkpoint", str(trained[1]), "--data", missing], capsys, missing)
    expect_error(["check"], capsys, "give a dataset")


def test_bad_bbox_in_annotations(trained, tmp_path, capsys):
    data = bad_bbox_dataset(trained[0], tmp_path / "bad")
    file = str(data / "annotations.json")
    expect_error(["check", str(data)], capsys, file, "annotations[1]", "bbox", "'wide'")
    expect_error(["train", "--data", str(data), "--out", str(tmp_path / "run")], capsys, file, "annotations[1]")


def test_bad_config(trained, tmp_path, capsys):
    data = str(trained[0])
    out = str(tmp_path / "run")
    expect_error(["train", "--data", data, "--out", out, "--set", "train.lrr=1"], capsys, "train.lrr")
    expect_error(["train", "--data", data, "--out", out, "--set", "train.lr=fast"], capsys, "train.lr", "'fast'")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-4\n")
    expect_error(["train", "--data", data, "--out", out, "--config", str(broken)], capsys, str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epoch: 3\n")
    expect_error(["train", "--data", data, "--out", out, "--config", str(unknown)], capsys, str(unknown), "epoch'")
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    data, run, _ = trained
    model = corrupt_checkpoint(run, tmp_path / "run")
    expect_error(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(data)], capsys, str(model))
    image = str(next((data / "val" / "images").iterdir()))
    expect_error(["predict", "--checkpoint", str(tmp_path / "run"), image, "--out", str(tmp_path / "p")],
                 capsys, str(model))
    expect_error(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--resume"], capsys, str(model))
    expect_error(["train", "--data", str(data), "--out", str(tmp_path / "empty"), "--resume"], capsys,
                 str(tmp_path / "empty"))
    # The console script exits 2 too, with the message and no traceback.
    done = subprocess.run([str(DETRKIT), "eval", "--checkpoint", str(tmp_path / "run"), "--data", str(data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert str(model) in done.stderr and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
