"""Query recollection: baseline vs SQR vs DQR, the same number of epochs on the synthetic data.

For each detector (small Deformable DETR, small DETR) and each recollection mode, trains from
scratch for ``--epochs`` (each configuration in its own process, so peak memory is its own), then
prints AP, per-stage AP, the last stage's TP fading / FP exacerbation rates (detrkit.analysis), and
the training step time and peak memory relative to the baseline measured in the same run.

``--recurrent`` also trains the recurrent mode and prints, for its single-stage model (the last
decoder layer alone, run T times), AP at T = 1..8 and the parameter counts, all and decoder only
(layers and per-layer heads), of the trained model and of the single-stage one.

    python bench/sqr.py [--epochs 12] [--seeds 0 1] [--detectors deformable_detr_small detr_small]
                        [--decoder-layers 6] [--recurrent]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import torch

MODES = ("none", "sqr", "dqr")
MAX_STEPS = 8  # the recurrent single-stage model is scored at T = 1..MAX_STEPS


def run_one(preset: str, mode: str, seed: int, epochs: int, data: Path, out: Path,
            decoder_layers: int | None = None) -> dict:
    """Train and evaluate one configuration (called in a fresh process)."""
    from detrkit import config, presets
    from detrkit.analysis import evaluate_stages, fading_rates
    from detrkit.build import uses_focal_loss
    from detrkit.data.coco import CocoDetection, resolve_split
    from detrkit.data.transforms import make_transforms
    from detrkit.demo import CONFIG
    from detrkit.engine import Run
    from detrkit.recollection import parameter_counts, recurrent_model

    cfg = config.load_yaml(CONFIG)
    base = presets.preset(preset)
    cfg.model, cfg.loss, cfg.matcher = base.model, base.loss, base.matcher
    cfg.model.recollection = mode
    if decoder_layers:
        cfg.model.transformer.num_decoder_layers = decoder_layers
    cfg.train.seed, cfg.train.epochs, cfg.train.time_limit, cfg.train.eval_every = seed, epochs, 0, 0
    cfg.data.num_workers = 0
    train_set = CocoDetection(*resolve_split(data, "train"), make_transforms(cfg.data, train=True))
    val_set = CocoDetection(*resolve_split(data, "val"), make_transforms(cfg.data, train=False))
    run = Run(cfg, train_set.categories, out, torch.device("cpu"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    stats = run.train(train_set, val_set, log_every=1, echo=lambda _: None)
    train_seconds = time.monotonic() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_times = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if "loss" in a and "loss" in b]
    stages = evaluate_stages(run.model, run.postprocess, val_set, run.categories, torch.device("cpu"))
    rates = fading_rates(run.model, val_set, torch.device("cpu"), focal=uses_focal_loss(cfg))
    result = {"preset": preset, "mode": mode, "seed": seed, "AP": stats["AP"], "AP50": stats["AP50"],
              "stage_AP": [s["AP"] for s in stages], "tp_fading": rates.tp_fading_rate,
              "fp_exacerbation": rates.fp_exacerbation_rate, "step_s": median(step_times),
              "train_s": train_seconds, "peak_mb": peak_kb / 1024}
    if mode == "recurrent":
        # Pass t of the MAX_STEPS-step loop is the output of the T = t model: one evaluation scores them all.
        single, _ = recurrent_model(run.model, cfg, MAX_STEPS, f"{preset} recurrent run")
        looped = evaluate_stages(single, run.postprocess, val_set, run.categories, torch.device("cpu"))
        result.update(recurrent_AP=[s["AP"] for s in looped],
                      params={"trained": parameter_counts(run.model), "single": parameter_counts(single)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--detectors", nargs="+", default=["deformable_detr_small", "detr_small"])
    parser.add_argument("--data", default="runs/bench/shapes-sqr")
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--decoder-layers", type=int, help="decoder layers of every detector (default: the preset's)")
    parser.add_argument("--recurrent", action="store_true",
                        help="also train the recurrent mode and score its single-stage model at T = 1..8")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    data = Path(args.data)
    if args.one:
        preset, mode, seed = args.one.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_one(preset, mode, int(seed), args.epochs, data, Path(tmp), args.decoder_layers)))
        return
    if not (data / "val" / "annotations.json").exists():
        from detrkit.data.synth import generate
        generate(data, num_train=args.num_train, num_val=100, seed=0)
    modes = MODES + ("recurrent",) if args.recurrent else MODES
    layers = ["--decoder-layers", str(args.decoder_layers)] if args.decoder_layers else []
    results = []
    for preset in args.detectors:
        for seed in args.seeds:
            for mode in modes:
                cmd = [sys.executable, __file__, "--one", f"{preset},{mode},{seed}", "--epochs", str(args.epochs),
                       "--data", str(data), *layers]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                results.append(json.loads(line))
                r = results[-1]
                print(f"{preset} {mode} seed {seed}: AP {r['AP']:.3f} step {r['step_s']:.3f}s", flush=True)
    depth = f"{args.decoder_layers} decoder layers" if args.decoder_layers else "the presets' decoder layers"
    print(f"\n{args.epochs} epochs each, seeds {args.seeds}, {depth}; ratios against the baseline (none) of the same run")
    print(f"{'detector':24} {'mode':9} {'AP':>6} {'AP50':>6} {'per-stage AP':>36} {'TPF':>5} {'FPE':>5} "
          f"{'step':>6} {'mem':>6}")
    for preset in args.detectors:
        base = [r for r in results if r["preset"] == preset and r["mode"] == "none"]
        for mode in modes:
            rs = [r for r in results if r["preset"] == preset and r["mode"] == mode]
            stage_ap = " ".join(f"{mean(s):.3f}" for s in zip(*(r["stage_AP"] for r in rs)))
            step = mean(r["step_s"] for r in rs) / mean(r["step_s"] for r in base)
            mem = mean(r["peak_mb"] for r in rs) / max(mean(r["peak_mb"] for r in base), 1e-9)
            print(f"{preset:24} {mode:9} {mean(r['AP'] for r in rs):6.3f} {mean(r['AP50'] for r in rs):6.3f} "
                  f"{stage_ap:>36} {mean(r['tp_fading'] for r in rs):5.2f} {mean(r['fp_exacerbation'] for r in rs):5.2f} "
                  f"{step:5.2f}x {mem:5.2f}x")
    if args.recurrent:
        print("\nrecurrent: the trained model's last decoder layer alone, run T times (AP); parameters "
              "of the trained and of the single-stage model, all and in the decoder")
        print(f"{'detector':24} " + " ".join(f"{f'T={t}':>6}" for t in range(1, MAX_STEPS + 1)) +
              f" {'trained':>12} {'single':>12} {'dec trained':>11} {'dec single':>11}")
        for preset in args.detectors:
            rs = [r for r in results if r["preset"] == preset and r["mode"] == "recurrent"]
            ap = " ".join(f"{mean(a):6.3f}" for a in zip(*(r["recurrent_AP"] for r in rs)))
            (total, decoder), (single, single_decoder) = rs[0]["params"]["trained"], rs[0]["params"]["single"]
            print(f"{preset:24} {ap} {total:12,} {single:12,} {decoder:11,} {single_decoder:11,}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
