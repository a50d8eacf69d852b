"""``make demo``: synthetic data -> a small detector trained for a bounded time -> COCO table -> pictures.

Everything lands under ``--out`` (``runs/demo``): ``data/`` (the generated dataset), ``run/``
(checkpoints, ``metrics.jsonl`` with the AP curve over time), ``predictions/`` (validation images
with their detections drawn) and ``metrics.json`` (the final 12 COCO numbers).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from detrkit import config, presets
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.image import read_image
from detrkit.data.synth import generate
from detrkit.data.transforms import make_transforms
from detrkit.engine import Run
from detrkit.evaluation import format_table
from detrkit.inference import load
from detrkit.viz import draw_detections

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def curve(metrics_file: Path) -> list[dict]:
    """The evaluations logged during training: [{"time", "step", "AP", "AP50", ...}]."""
    rows = []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            rows.append({"time": record["time"], "step": record["step"], **record["eval"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detrkit.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--config", default=str(CONFIG), help="YAML config (a preset plus the demo's settings)")
    parser.add_argument("--time-limit", type=float, help="seconds of training (default: the config's)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    # sigmoid (focal) scores of a briefly trained model sit well below the paper's 0.7
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold of the pictures")
    args = parser.parse_args(argv)

    out = Path(args.out)
    data = out / "data"
    if not (data / "val" / "annotations.json").exists():
        print(f"generating the synthetic dataset in {data}")
        generate(data, num_train=args.num_train, num_val=args.num_val, seed=0)
    cfg = config.apply_overrides(config.load_yaml(args.config, presets.preset("detr_small")), args.set)
    if args.time_limit is not None:
        cfg.train.time_limit = args.time_limit
    train_set = CocoDetection(*resolve_split(data, "train"), make_transforms(cfg.data, train=True))
    val_set = CocoDetection(*resolve_split(data, "val"), make_transforms(cfg.data, train=False))

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts from scratch every time
    print(f"training {cfg.model.arch} ({Path(args.config).name}) for {cfg.train.time_limit:.0f} s "
          f"on {len(train_set)} images, {torch.get_num_threads()} threads")
    start = time.monotonic()
    stats = Run(cfg, train_set.categories, run_dir, torch.device("cpu")).train(train_set, val_set)
    print(f"\ntrained in {time.monotonic() - start:.0f} s; held-out split ({len(val_set)} images):")
    print(format_table(stats))
    (out / "metrics.json").write_text(json.dumps(stats, indent=2))

    print("\nAP over training time:")
    print(f"{'time s':>8} {'step':>6} {'AP':>6} {'AP50':>6} {'APs':>6}")
    for row in curve(run_dir / "metrics.jsonl"):
        print(f"{row['time']:8.0f} {row['step']:6d} {row['AP']:6.3f} {row['AP50']:6.3f} {row['APs']:6.3f}")

    detector = load(run_dir)
    pictures = out / "predictions"
    pictures.mkdir(parents=True, exist_ok=True)
    images_dir = resolve_split(data, "val")[0]
    for info in val_set.gt["images"][:12]:
        path = images_dir / info["file_name"]
        draw_detections(read_image(path), detector.predict(path, threshold=args.threshold)).save(pictures / f"{path.stem}.png")
    print(f"\npictures of the predictions: {pictures}/")


if __name__ == "__main__":
    main()
