"""DETR vs Deformable DETR: the same synthetic data, the same settings, the same wall time on this CPU.

The Deformable DETR paper's claims are much faster convergence and better small objects. Both
small presets are trained from scratch with the demo's data settings for ``--minutes`` each (one
after the other, so they do not share the CPU), then evaluated on the held-out split. Prints AP,
AP50, AP_small of each and the ratio Deformable / DETR.

    python bench/convergence.py [--minutes 10] [--data runs/bench/shapes]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from detrkit import config, presets
from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.synth import generate
from detrkit.data.transforms import make_transforms
from detrkit.demo import CONFIG
from detrkit.engine import Run


def train(preset: str, data: Path, seconds: float, out: Path) -> dict:
    cfg = config.load_yaml(CONFIG)
    base = presets.preset(preset)
    cfg.model, cfg.loss, cfg.matcher = base.model, base.loss, base.matcher
    cfg.train.time_limit, cfg.train.eval_every = seconds, 0
    train_set = CocoDetection(*resolve_split(data, "train"), make_transforms(cfg.data, train=True))
    val_set = CocoDetection(*resolve_split(data, "val"), make_transforms(cfg.data, train=False))
    run = Run(cfg, train_set.categories, out / preset, torch.device("cpu"))
    stats = run.train(train_set, val_set, echo=lambda _: None)
    return {"steps": run.global_step, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--data", default="runs/bench/shapes")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "val" / "annotations.json").exists():
        generate(data, num_train=2000, num_val=200, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {p: train(p, data, args.minutes * 60, Path(tmp)) for p in ("detr_small", "deformable_detr_small")}
    detr, deform = results["detr_small"], results["deformable_detr_small"]
    print(f"\nsame data, {args.minutes:g} min of training each on this CPU ({torch.get_num_threads()} threads)")
    print(f"{'':8} {'DETR':>8} {'Deformable':>11} {'ratio':>7}")
    for key in ("AP", "AP50", "APs", "APm", "APl", "steps"):
        ratio = deform[key] / detr[key] if detr[key] > 0 else float("inf")
        print(f"{key:8} {detr[key]:8.3f} {deform[key]:11.3f} {ratio:7.2f}" if key != "steps"
              else f"{key:8} {detr[key]:8d} {deform[key]:11d} {ratio:7.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
