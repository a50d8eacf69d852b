"""DETR vs Deformable DETR: the same synthetic data, the same wall time on this CPU.

The Deformable DETR paper's claims are much faster convergence and better small objects. The small
presets, each with its own recipe, are trained from scratch with the demo's data settings for
``--minutes`` each (one after the other, so they do not share the CPU), then evaluated on the
held-out split. Prints AP, AP50, AP_small... of each and each one's ratio to the first (DETR).

    python bench/convergence.py [--minutes 10] [--data runs/bench/shapes] [--presets detr_small ...]
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
    """Each preset with its own recipe (model, loss, learning rates) on the demo's data settings,
    in mixed precision (bf16 on CPUs that have it), for ``seconds``."""
    cfg = config.load_yaml(CONFIG)
    base = presets.preset(preset)
    cfg.model, cfg.loss, cfg.matcher, cfg.train = base.model, base.loss, base.matcher, base.train
    cfg.train.amp, cfg.train.time_limit, cfg.train.eval_every = True, seconds, 0
    train_set = CocoDetection(*resolve_split(data, "train"), make_transforms(cfg.data, train=True))
    val_set = CocoDetection(*resolve_split(data, "val"), make_transforms(cfg.data, train=False))
    run = Run(cfg, train_set.categories, out / preset, torch.device("cpu"))
    stats = run.train(train_set, val_set, echo=lambda _: None)
    return {"steps": run.global_step, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--data", default="runs/bench/shapes")
    parser.add_argument("--presets", nargs="+", default=["detr_small", "deformable_detr_small",
                                                         "deformable_detr_small_two_stage"])
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "val" / "annotations.json").exists():
        generate(data, num_train=2000, num_val=200, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {p: train(p, data, args.minutes * 60, Path(tmp)) for p in args.presets}
    first = results[args.presets[0]]
    print(f"\nsame data, {args.minutes:g} min of training each on this CPU ({torch.get_num_threads()} threads); "
          f"ratios to {args.presets[0]}")
    width = max(map(len, args.presets))
    print(f"{'':8}" + "".join(f" {p:>{width}} {'ratio':>6}" for p in args.presets))
    for key in ("AP", "AP50", "APs", "APm", "APl", "steps"):
        cells = []
        for p in args.presets:
            value, ratio = results[p][key], results[p][key] / first[key] if first[key] > 0 else float("inf")
            cells.append(f" {value:{width}d} {ratio:6.2f}" if key == "steps" else f" {value:{width}.3f} {ratio:6.2f}")
        print(f"{key:8}" + "".join(cells))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
