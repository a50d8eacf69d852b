"""The ``detrkit`` command: synth, check, train, eval, analyze, predict, viz, convert, export, recurrent."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detrkit.errors import DetrkitError
from detrkit.recollection import MODES


def _add_dataset_args(p: argparse.ArgumentParser, split_default: str = "val") -> None:
    p.add_argument("--data", help="dataset folder: annotations.json + images/, or train/ and val/ of that form")
    p.add_argument("--split", default=split_default, help="train or val, when --data has both")
    p.add_argument("--images", help="images folder (with --annotations, instead of --data)")
    p.add_argument("--annotations", help="COCO annotations JSON (with --images, instead of --data)")


def _dataset_paths(args: argparse.Namespace, split: str | None = None) -> tuple[Path, Path]:
    from detrkit.data.coco import resolve_split
    if args.images or args.annotations:
        if not (args.images and args.annotations):
            raise DetrkitError("--images and --annotations go together")
        return Path(args.images), Path(args.annotations)
    if not args.data:
        raise DetrkitError("give a dataset: --data DIR, or --images DIR --annotations FILE")
    return resolve_split(args.data, split or args.split)


def cmd_synth(args: argparse.Namespace) -> None:
    from detrkit.data.synth import generate
    generate(args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.size,
             num_classes=args.classes, seed=args.seed)
    print(f"wrote {args.num_train} train and {args.num_val} val images to {args.out}")


def cmd_check(args: argparse.Namespace) -> None:
    from detrkit.data.check import check_dataset, format_report
    from detrkit.data.coco import resolve_split
    if args.images or args.annotations:
        splits = [_dataset_paths(args)]
    elif not args.dir:
        raise DetrkitError("give a dataset: detrkit check DIR, or --images DIR --annotations FILE")
    elif (Path(args.dir) / "annotations.json").exists():
        splits = [resolve_split(args.dir, None)]
    else:
        splits = [resolve_split(args.dir, s) for s in ("train", "val")]
    for images, annotations in splits:
        print(format_report(check_dataset(images, annotations)))


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from detrkit import config, distributed, presets
    from detrkit.checkpoint import latest_checkpoint, read_config
    from detrkit.data.coco import CocoDetection
    from detrkit.data.transforms import make_transforms
    from detrkit.engine import Run

    out = Path(args.out)
    if args.resume:
        cfg = config.from_dict(read_config(latest_checkpoint(out))["config"])
    else:
        cfg = presets.preset(args.preset)
        if args.config:
            cfg = config.load_yaml(args.config, cfg)
    config.apply_overrides(cfg, args.set or [])
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.time_limit is not None:
        cfg.train.time_limit = args.time_limit
    if args.recollection is not None:
        cfg.model.recollection = args.recollection
    if args.backbone_weights:
        cfg.model.backbone.weights = args.backbone_weights
    device = distributed.init_from_env()
    if args.device:
        device = torch.device(args.device)
    train_images, train_ann = _dataset_paths(args, "train")
    train_set = CocoDetection(train_images, train_ann, make_transforms(cfg.data, train=True))
    val_set = None
    if not args.no_eval:
        val_images, val_ann = (Path(args.val_images), Path(args.val_annotations)) if args.val_images \
            else _dataset_paths(args, "val")
        val_set = CocoDetection(val_images, val_ann, make_transforms(cfg.data, train=False))
    run = Run(cfg, train_set.categories, out, device)
    if args.resume:
        run.restore(out)
        print(f"resuming {out} at epoch {run.epoch}, step {run.global_step}")
    elif distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml(cfg))
    stats = run.train(train_set, val_set)
    if stats and distributed.is_main():
        from detrkit.evaluation import format_table
        print(format_table(stats))
    distributed.cleanup()


def _detector_and_dataset(args: argparse.Namespace):
    """``--checkpoint`` loaded, and the dataset arguments' images prepared as for evaluation."""
    from detrkit.data.coco import CocoDetection
    from detrkit.data.transforms import make_transforms
    from detrkit.inference import load
    detector = load(args.checkpoint, args.device, args.recurrent_steps)
    images, annotations = _dataset_paths(args)
    return detector, CocoDetection(images, annotations, make_transforms(detector.cfg.data, train=False))


def cmd_eval(args: argparse.Namespace) -> None:
    from detrkit.evaluation import evaluate_files, format_table
    if args.predictions:
        if args.per_stage:
            raise DetrkitError("--per-stage needs --checkpoint: a results file holds one set of predictions")
        _, annotations = _dataset_paths(args)
        stats = evaluate_files(args.predictions, annotations)
    else:
        if not args.checkpoint:
            raise DetrkitError("give --checkpoint C (or --predictions RESULTS.json)")
        from detrkit.engine import evaluate
        detector, dataset = _detector_and_dataset(args)
        device = next(detector.parameters()).device
        if args.per_stage:
            from detrkit.analysis import evaluate_stages, format_stage_table
            stages = evaluate_stages(detector.model, detector.postprocess, dataset, detector.categories, device,
                                     args.batch_size)
            print(format_stage_table(stages))
            if args.json:
                Path(args.json).write_text(json.dumps({"stages": stages}, indent=2))
            return
        stats = evaluate(detector.model, detector.postprocess, dataset, detector.categories, device,
                         args.batch_size)
    print(format_table(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))


def cmd_analyze(args: argparse.Namespace) -> None:
    from detrkit.analysis import fading_rates, format_fading, num_stages
    from detrkit.build import uses_focal_loss
    detector, dataset = _detector_and_dataset(args)
    counts = fading_rates(detector.model, dataset, next(detector.parameters()).device,
                          uses_focal_loss(detector.cfg), args.threshold, args.iou, args.batch_size)
    print(f"last stage of {num_stages(detector.model)} over {len(dataset)} images "
          f"(score >= {args.threshold:g}, IoU >= {args.iou:g}):")
    print(format_fading(counts))
    if args.json:
        Path(args.json).write_text(json.dumps(counts.to_dict(), indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from detrkit.data.image import read_image
    from detrkit.inference import load
    from detrkit.viz import draw_detections
    detector = load(args.checkpoint, args.device, args.recurrent_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_id, path in enumerate(args.images):
        image = read_image(path)
        det = detector.predict(image, threshold=args.threshold)
        for box, score, cat, name in zip(det.boxes.tolist(), det.scores.tolist(), det.category_ids, det.names):
            x0, y0, x1, y1 = box
            results.append({"image_id": image_id, "file_name": str(path), "category_id": cat,
                            "category_name": name, "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                            "score": round(score, 4)})
        draw_detections(image, det).save(out / f"{Path(path).stem}.png")
        print(f"{path}: {len(det.scores)} objects")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} and {len(args.images)} pictures")


def cmd_viz(args: argparse.Namespace) -> None:
    from detrkit import viz
    viz.main(args)


def _hints(args: argparse.Namespace) -> dict:
    return {"dilation": args.dilation or None, "nheads": args.nheads, "num_queries": args.num_queries}


def cmd_convert(args: argparse.Namespace) -> None:
    from detrkit.interop import convert
    print(f"wrote {convert(args.src, args.out, **_hints(args))}")


def cmd_export(args: argparse.Namespace) -> None:
    from detrkit.interop import export
    print(f"wrote {export(args.src, args.out, args.format, **_hints(args))}")


def cmd_recurrent(args: argparse.Namespace) -> None:
    from detrkit.checkpoint import save_model
    from detrkit.interop import load_model
    from detrkit.recollection import parameter_counts, recurrent_model
    model, cfg, categories = load_model(args.src)
    single, single_cfg = recurrent_model(model, cfg, args.steps, args.src)
    for name, m in ((f"{cfg.model.transformer.num_decoder_layers} decoder layers", model),
                    (f"1 decoder layer run {args.steps} times", single)):
        total, decoder = parameter_counts(m)
        print(f"{name:>28}: {total:>12,} parameters, {decoder:>12,} of them in the decoder")
    print(f"wrote {save_model(args.out, single, single_cfg.to_dict(), categories.to_dict())}")


def _add_recurrent_steps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recurrent-steps", type=int, metavar="T",
                   help="run a recurrent model's last decoder layer alone, T times (see detrkit recurrent)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detrkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a synthetic COCO-format dataset (train and val)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--size", type=int, default=160, help="largest image side in pixels")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="validate a dataset and print its statistics")
    p.add_argument("dir", nargs="?", help="dataset folder")
    p.add_argument("--images")
    p.add_argument("--annotations")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train a detector")
    p.add_argument("--preset", default="detr_small", help="named preset (see detrkit.presets)")
    p.add_argument("--config", help="YAML config applied on top of the preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4")
    _add_dataset_args(p, split_default="train")
    p.add_argument("--val-images")
    p.add_argument("--val-annotations")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-limit", type=float, help="seconds of training before stopping cleanly")
    p.add_argument("--recollection", choices=MODES,
                   help="query recollection in training (model.recollection): sqr, dqr, recurrent or none")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="torchvision ResNet state dict (.pth or .safetensors) to start the backbone from")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--device")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO metrics of a checkpoint or of a results file")
    p.add_argument("--checkpoint")
    p.add_argument("--predictions", help="COCO results JSON to score instead of running a model")
    _add_dataset_args(p)
    p.add_argument("--json", help="also write the 12 numbers to this file")
    p.add_argument("--per-stage", action="store_true",
                   help="score every decoder stage's predictions (one row per stage)")
    p.add_argument("--batch-size", type=int, default=4)
    _add_recurrent_steps(p)
    p.add_argument("--device")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the last decoder stage's TP fading and FP exacerbation rates (SQR paper)")
    p.add_argument("--checkpoint", required=True)
    _add_dataset_args(p)
    p.add_argument("--threshold", type=float, default=0.3, help="last-stage predictions scored at least this count")
    p.add_argument("--iou", type=float, default=0.5, help="IoU a true positive needs with its ground truth")
    p.add_argument("--json", help="also write the counts and rates to this file")
    p.add_argument("--batch-size", type=int, default=4)
    _add_recurrent_steps(p)
    p.add_argument("--device")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("predict", help="detect objects in images; write results.json and pictures")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.7)
    _add_recurrent_steps(p)
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("viz", help="pictures from the papers (attention maps, query box distributions)")
    from detrkit.viz import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_viz)

    for name, text in (("convert", "any loadable checkpoint -> detrkit's folder (config.json + model.safetensors)"),
                       ("export", "any loadable checkpoint -> a transformers folder (hf) or an official .pth")):
        p = sub.add_parser(name, help=text)
        p.add_argument("src", help="detrkit folder or run, official .pth, or HuggingFace save_pretrained folder")
        p.add_argument("--out", required=True, help="output folder (hf, convert) or .pth file (official)")
        if name == "export":
            p.add_argument("--format", choices=("hf", "official"), default="hf")
        p.add_argument("--dilation", action="store_true", help="the source has a DC5 (dilated) backbone")
        p.add_argument("--nheads", type=int, help="attention heads of an official checkpoint without args (8)")
        p.add_argument("--num-queries", type=int, help="queries of a two-stage official checkpoint without args")
        p.set_defaults(func=cmd_convert if name == "convert" else cmd_export)

    p = sub.add_parser("recurrent", help="a model trained with model.recollection=recurrent -> its last decoder "
                                         "layer alone, run T times: detrkit's folder (config.json + model.safetensors)")
    p.add_argument("src", help="detrkit folder or run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=6, metavar="T",
                   help="times the layer runs (changeable later: eval / predict --recurrent-steps)")
    p.set_defaults(func=cmd_recurrent)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DetrkitError as e:
        # One line whatever the message holds (YAML parser errors, for one, span several).
        print(f"detrkit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detrkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
