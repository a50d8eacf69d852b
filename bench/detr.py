"""Time detrkit against HuggingFace transformers, side by side: DETR against ``DetrForObjectDetection``,
Deformable DETR against ``DeformableDetrForObjectDetection``.

Both sides are built with random weights from the same configuration (nothing is downloaded):
the same ResNet (transformers' own ResNet on the HF side), d_model, heads, layers, FFN width,
queries, 91 classes, dropout, loss weights and matching costs. Timed:

* inference: eval mode, ``no_grad``, batch 1, at ``--size`` (default 512x512);
* one training step: batch 2, at ``--size``, 5 boxes per image, forward + loss (Hungarian matching,
  auxiliary losses on every decoder layer) + backward + grad-norm clip + optimiser step, with
  detrkit's optimiser (``make_optimizer``: AdamW, backbone at its own learning rate) on both sides.

The two are timed interleaved (alternating which goes first) after warm-up runs; the table
gives medians and the ratio HF / detrkit (> 1: detrkit is faster), also taken of the minima,
which a busy shared machine disturbs less.

Backbone recipe. transformers 5.x leaves every parameter of its ResNet backbone frozen (its
trainable-layer rule looks for "stage.N" in names that read "stages.N"), and always swaps batch
norm for frozen batch norm. The bench gives HF's backbone the recipe of the detrkit preset and
checks that both sides train the same number of parameters:
``detr_r50``: frozen BN, stem and layer1 frozen, layer2-4 trained (the DETR paper's recipe);
``detr_small``: trainable ``nn.BatchNorm2d`` (put back on the HF side), nothing frozen.
Left as they are on the HF side: dropout on the encoder's input, a finiteness check after every
encoder layer in training, no attention mask when nothing is padded.

    python bench/detr.py                                  # DETR and Deformable DETR presets, wall clock
    python bench/detr.py --models deformable_detr_r50
    python bench/detr.py --models detr_r50 --reps 9
    python bench/detr.py --models deformable_detr_r50 --size 800x1066 --train-reps 0   # inference at COCO scale
    OMP_WAIT_POLICY=PASSIVE python bench/detr.py --clock cpu   # on a busy machine
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detrkit.build import build_criterion, build_model  # noqa: E402
from detrkit.config import Config  # noqa: E402
from detrkit.data.coco import CategoryMap  # noqa: E402
from detrkit.engine import make_optimizer  # noqa: E402
from detrkit.interop.hf import hf_config as export_config  # noqa: E402
from detrkit.presets import preset  # noqa: E402

NUM_CLASSES = 91
BOXES_PER_IMAGE = 5


# ---------------------------------------------------------------- HuggingFace side

def hf_config(cfg: Config, model: nn.Module):
    """A transformers ``DetrConfig`` / ``DeformableDetrConfig`` equal to detrkit's ``cfg`` (transformers
    ResNet backbone): the export config of ``detrkit.interop``, plus the training settings."""
    from transformers import DeformableDetrConfig, DetrConfig, ResNetConfig

    categories = CategoryMap(list(range(1, NUM_CLASSES + 1)), [str(i) for i in range(NUM_CLASSES)])
    values = export_config(model, cfg, categories, "hf")
    dropout = cfg.model.transformer.dropout
    values.update(
        # DETR's dropout sits on the attention weights, inside the FFN and on every residual.
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
        auxiliary_loss=cfg.model.aux_loss,
        # DetrConfig types these as int
        class_cost=int(cfg.matcher.cost_class), bbox_cost=int(cfg.matcher.cost_bbox),
        giou_cost=int(cfg.matcher.cost_giou), bbox_loss_coefficient=int(cfg.loss.bbox_coef),
        giou_loss_coefficient=int(cfg.loss.giou_coef), eos_coefficient=cfg.loss.eos_coef,
        focal_alpha=cfg.loss.focal_alpha)
    for key in ("architectures", "model_type", "detrkit_category_ids"):
        values.pop(key)
    if not cfg.model.with_box_refine:  # transformers shares the heads between layers only when tying
        values.pop("tie_word_embeddings", None)
    values["backbone_config"] = ResNetConfig(**{k: v for k, v in values["backbone_config"].items() if k != "model_type"})
    return (DetrConfig if cfg.model.arch == "detr" else DeformableDetrConfig)(**values)


def _unfreeze_batch_norm(module: nn.Module) -> None:
    """Put trainable ``nn.BatchNorm2d`` back where transformers swapped in its frozen BN."""
    for name, child in module.named_children():
        if type(child).__name__.endswith("FrozenBatchNorm2d"):
            setattr(module, name, nn.BatchNorm2d(child.weight.numel()))
        else:
            _unfreeze_batch_norm(child)


def build_hf(cfg: Config, model: nn.Module) -> nn.Module:
    """transformers' model with random weights and detrkit's backbone recipe: frozen BN with the
    listed parts frozen (``frozen_bn``), or trainable BN with everything trained (``bn``)."""
    from transformers import DeformableDetrForObjectDetection, DetrForObjectDetection

    hf_class = DetrForObjectDetection if cfg.model.arch == "detr" else DeformableDetrForObjectDetection
    hf = hf_class(hf_config(cfg, model))
    backbone = next(m for m in hf.modules() if type(m).__name__ == "ResNetBackbone")
    if cfg.model.backbone.norm == "bn":
        _unfreeze_batch_norm(backbone)
    # HF names: embedder.* is the stem, encoder.stages.{0..3}.* are layer1..layer4.
    parts = {"embedder": "stem", **{f"encoder.stages.{i}": f"layer{i + 1}" for i in range(4)}}
    for name, p in backbone.named_parameters():
        part = next(v for k, v in parts.items() if name.startswith(k))
        p.requires_grad_(cfg.model.backbone.train and part not in cfg.model.backbone.frozen)
    return hf


# ---------------------------------------------------------------- steps

def make_batch(batch: int, size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``batch`` random images of ``size`` (H, W), unpadded, with random boxes and labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g)
    mask = torch.zeros(batch, *size, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        wh = 0.05 + 0.4 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        cxcy = wh / 2 + (1 - wh) * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        targets.append({"boxes": torch.cat([cxcy, wh], 1),
                        "labels": torch.randint(0, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=g)})
    return images, mask, targets


class Side:
    """One implementation: its model, loss and optimiser, and the two timed operations."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, clip_max_norm: float):
        self.name, self.model, self.optimizer, self.clip_max_norm = name, model, optimizer, clip_max_norm
        self.times: dict[str, list[float]] = {"infer": [], "train": []}

    def timed(self, what: str, batch, clock=time.perf_counter) -> float:
        start = clock()
        getattr(self, what)(*batch)
        elapsed = clock() - start
        self.times[what].append(elapsed)
        return elapsed

    def train(self, images, mask, targets) -> None:
        self.model.train()
        loss = self.loss(images, mask, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_max_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        self.optimizer.step()


class Detrkit(Side):
    def __init__(self, cfg: Config):
        model = build_model(cfg)
        super().__init__("detrkit", model, make_optimizer(model, cfg.train), cfg.train.clip_max_norm)
        self.criterion = build_criterion(cfg)

    @torch.no_grad()
    def infer(self, images, mask, targets) -> None:
        self.model.eval()
        self.model(images, mask)

    def loss(self, images, mask, targets) -> torch.Tensor:
        return self.criterion(self.model(images, mask), targets)["loss"]


class HF(Side):
    def __init__(self, cfg: Config, ours: nn.Module):
        model = build_hf(cfg, ours)
        # detrkit's optimiser and learning-rate groups over HF's parameters
        super().__init__("transformers", model, make_optimizer(model, cfg.train, backbone_prefix="model.backbone."),
                         cfg.train.clip_max_norm)

    @torch.no_grad()
    def infer(self, images, mask, targets) -> None:
        self.model.eval()
        self.model(pixel_values=images, pixel_mask=(~mask).long())

    def loss(self, images, mask, targets) -> torch.Tensor:
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        return self.model(pixel_values=images, pixel_mask=(~mask).long(), labels=labels).loss


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def bench_model(name: str, size: tuple[int, int], reps: dict[str, int], warmup: int,
                clock) -> list[tuple[str, float, float, float]]:
    """Time both sides of preset ``name`` on images of ``size`` (H, W); one row (label, detrkit median,
    HF median, ratio of the minima) for inference and one for the training step (none with 0 repetitions)."""
    cfg = preset(name)
    cfg.model.num_classes = NUM_CLASSES
    torch.manual_seed(0)
    ours = Detrkit(cfg)
    sides = [ours, HF(cfg, ours.model)]
    for s in sides:
        print(f"  {name} {s.name:12s} params {count(s.model) / 1e6:6.2f}M, "
              f"trainable {count(s.model, True) / 1e6:6.2f}M", flush=True)
    a, b = sides
    if (count(a.model), count(a.model, True)) != (count(b.model), count(b.model, True)):
        raise SystemExit(f"{name}: detrkit and transformers models differ in (trainable) parameter count")

    rows = []
    for what, batch_size in (("infer", 1), ("train", 2)):
        if not reps[what]:
            continue
        batch = make_batch(batch_size, size, seed=1)
        for s in sides:
            for _ in range(warmup):
                getattr(s, what)(*batch)
        for i in range(reps[what]):
            for s in (sides if i % 2 == 0 else sides[::-1]):
                s.timed(what, batch, clock)
        med = [statistics.median(s.times[what]) for s in sides]
        best = [min(s.times[what]) for s in sides]
        spread = "  ".join(f"{s.name} {min(s.times[what]):.3f}-{max(s.times[what]):.3f}" for s in sides)
        print(f"  {name} {what}: {spread} s", flush=True)
        label = f"{name} {'inference (b=1)' if what == 'infer' else 'train step (b=2)'}"
        rows.append((label, *med, best[1] / best[0]))
    return rows


def image_size(text: str) -> tuple[int, int]:
    """"800x1066" -> (800, 1066): height by width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 800x1066") from None
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="detr_small,detr_r50,deformable_detr_small,deformable_detr_r50",
                        help="comma-separated detrkit presets")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per side (median reported)")
    parser.add_argument("--train-reps", type=int, default=None,
                        help="repetitions for the train step (default --reps; 0: inference only)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=image_size, default=(512, 512), metavar="HxW",
                        help="image height x width (default 512x512; 800x1066: a 4:3 COCO image at the papers' scale)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, steadier on a shared machine (run with OMP_WAIT_POLICY=PASSIVE "
                             "so that idle OpenMP threads sleep instead of spinning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{args.size[0]}x{args.size[1]}, {BOXES_PER_IMAGE} boxes per image", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    reps = {"infer": args.reps, "train": args.reps if args.train_reps is None else args.train_reps}
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args.size, reps, args.warmup, clock)

    print(f"\nmedians of {args.reps} ({args.clock} clock) at {args.size[0]}x{args.size[1]}; "
          "HF / detrkit > 1: detrkit is faster")
    print(f"| {'model':40s} | detrkit s | HF s  | HF / detrkit | (of the minima) |")
    print(f"|{'-' * 42}|-----------|-------|--------------|-----------------|")
    for label, ours, theirs, best_ratio in rows:
        print(f"| {label:40s} | {ours:9.3f} | {theirs:5.3f} | {theirs / ours:11.2f}x | {best_ratio:14.2f}x |")


if __name__ == "__main__":
    main()
