"""Training and evaluation loops.

Exact resumption is a design constraint here: the data order and every image's augmentation are
functions of (seed, epoch, index), never of a shared random stream, so a run restarted from a
checkpoint taken after any step sees the same batches, the same crops and the same dropout masks
as the run that was not interrupted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from detrkit import checkpoint, distributed
from detrkit.build import build_criterion, build_model, build_postprocess
from detrkit.config import Config, TrainConfig
from detrkit.criterion import nonfinite_terms
from detrkit.data.batch import collate
from detrkit.data.coco import CategoryMap, CocoDetection
from detrkit.ema import EMA
from detrkit.errors import CheckpointError, TrainingError
from detrkit.evaluation import CocoEvaluator
from detrkit.postprocess import to_coco_results


# ---------------------------------------------------------------- data order

class SeededItems(Dataset):
    """Wraps a dataset so that item ``i`` of epoch ``e`` is augmented with its own seed."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(f"{self.seed}-{self.epoch}-{index}")
        torch.manual_seed(random.getrandbits(63))
        try:
            return self.dataset[index]
        finally:  # with num_workers=0 this runs in the training process: leave its streams untouched
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


class EpochSampler(Sampler[int]):
    """A permutation of the dataset per (seed, epoch), split between processes.

    Every process gets the same number of items (the shortest shards repeat a few indices), so
    all processes run the same number of steps and none waits forever in a collective."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip`` items of this process's shard are left out (resuming in the middle of an epoch)."""
        self.epoch, self.skip = epoch, skip

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        world, rank = distributed.world_size(), distributed.rank()
        per_process = math.ceil(self.size / world)
        order = (order * math.ceil(per_process * world / max(self.size, 1)))[:per_process * world]
        return order[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.skip:])

    def __len__(self) -> int:
        return max(math.ceil(self.size / distributed.world_size()) - self.skip, 0)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))  # keeps worker seeding off the global RNG


# ---------------------------------------------------------------- optimisation

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def param_lr(name: str, cfg: TrainConfig, backbone_prefix: str = "backbone.") -> float:
    """The learning rate of parameter ``name``: the backbone at its own (lower) rate, Deformable
    DETR's sampling offsets and reference-point projection at ``lr * lr_linear_proj_mult``."""
    if name.startswith(backbone_prefix):
        return cfg.lr_backbone
    if any(key in name for key in LINEAR_PROJ_NAMES):
        return cfg.lr * cfg.lr_linear_proj_mult
    return cfg.lr


def _match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's loaded optimiser state the parameter's memory layout (the backbone's
    channels-last weights): fused AdamW walks a parameter and its state in memory order, so a
    state loaded contiguous would silently update the wrong elements. A hook on every optimiser
    :func:`make_optimizer` returns, so no caller of ``load_state_dict`` can miss it."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def make_optimizer(model: nn.Module, cfg: TrainConfig, backbone_prefix: str = "backbone.") -> torch.optim.Optimizer:
    """AdamW with one group per learning rate (:func:`param_lr`); frozen parameters left out.

    The fused implementation (one pass over each parameter instead of several) where torch has
    it: measured 30 ms instead of 103 ms per DETR-R50 step on CPU."""
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(param_lr(name, cfg, backbone_prefix), []).append(p)
    fused = all(p.device.type in ("cpu", "cuda") for ps in groups.values() for p in ps)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr} for lr, ps in groups.items()],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    optimizer.register_load_state_dict_post_hook(_match_state_layouts)
    return optimizer


def lr_factor(cfg: TrainConfig, epoch: int, global_step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then a 10x drop at epoch ``lr_drop``."""
    warmup = min(1.0, (global_step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warmup * (0.1 if epoch >= cfg.lr_drop else 1.0)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision where the hardware supports it: bf16 where available, else fp16 (CUDA).
    A CPU without oneDNN's bf16 kernels (before AVX-512) would emulate bf16 slower than float32,
    so there it stays in float32, with one warning."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and not cpu_has_bf16():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether oneDNN has fast bf16 kernels for this CPU (AVX-512 and later)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private; absent from some builds
    supported = bool(check and check())
    if not supported:
        warnings.warn("train.amp: this CPU has no fast bfloat16 kernels; running in float32", stacklevel=2)
    return supported


def to_device(images: torch.Tensor, mask: torch.Tensor, targets: list[dict], device: torch.device):
    return images.to(device), mask.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def compute_losses(criterion: nn.Module, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The criterion's losses, or a clear stop before a non-finite loss reaches the weights.

    The stop is agreed between processes: one that stopped alone would leave the others waiting
    forever in their next all-reduce."""
    error = None
    try:
        losses = criterion(outputs, targets)
        flag = (~torch.isfinite(losses["loss"])).float().reshape(1)
    except TrainingError as e:  # e.g. an image with more objects than queries, or a NaN matching cost
        error, flag = e, torch.ones(1, device=outputs["pred_boxes"].device)
    local = flag.item()
    if distributed.is_distributed():
        torch.distributed.all_reduce(flag)
    if flag.item():
        ids = [int(t["image_id"]) for t in targets]
        if error is not None:
            raise TrainingError(f"{error} (batch of images {ids}); the step was not applied and the "
                                "weights are unchanged") from None
        bad = nonfinite_terms(losses)
        where = (f"{', '.join(bad)} for images {ids}" if bad
                 else f"the weighted total overflowed for images {ids}" if local else "on another process")
        raise TrainingError(f"non-finite loss ({where}); the step was not applied and the "
                            "weights are unchanged. Lower train.lr or check these images' boxes.")
    return losses


# ---------------------------------------------------------------- training

class Run:
    """A training run in ``run_dir``: model, optimiser, loop state, and where it logs."""

    def __init__(self, cfg: Config, categories: CategoryMap, run_dir: str | Path, device: torch.device):
        self.cfg, self.categories, self.run_dir, self.device = cfg, categories, Path(run_dir), device
        cfg.model.num_classes = len(categories)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg).to(device)
        self.criterion = build_criterion(cfg)
        self.postprocess = build_postprocess(cfg)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.epoch, self.step_in_epoch, self.global_step, self.elapsed = 0, 0, 0, 0.0

    @property
    def inference_model(self) -> nn.Module:
        """The model that is evaluated and saved as the run's model: the moving average of the
        weights when ``train.ema_decay`` is set, else the trained weights themselves."""
        return self.ema.module if self.ema else self.model

    def save(self) -> Path:
        opt_tensors, opt_structure = checkpoint.optimizer_to_tensors(self.optimizer)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "elapsed": self.elapsed, "optimizer": opt_structure, "rng_python": _jsonable(random.getstate()),
                 "rng_numpy": _jsonable(np.random.get_state())}
        extra = {checkpoint.OPTIMIZER_FILE: opt_tensors, checkpoint.STATE_FILE: state}
        if self.ema:
            extra[checkpoint.LIVE_MODEL_FILE] = self.model.state_dict()
        path = checkpoint.checkpoint_dir(self.run_dir, self.global_step)
        checkpoint.save_model(path, self.inference_model, self.cfg.to_dict(), self.categories.to_dict(), extra=extra)
        checkpoint.publish_latest(self.run_dir, path)
        return path

    def restore(self, path: str | Path) -> None:
        ckpt = checkpoint.latest_checkpoint(path)
        saved = checkpoint.read_config(ckpt).get("categories")
        if saved is not None and CategoryMap.from_dict(saved) != self.categories:
            # Same count, other ids or names: the weights would load and train on the wrong classes.
            raise CheckpointError(f"{ckpt}: trained on categories {CategoryMap.from_dict(saved)}, "
                                  f"but the dataset has {self.categories}")
        state = checkpoint.read_state(ckpt)
        tensors = checkpoint.read_tensors(ckpt / checkpoint.OPTIMIZER_FILE)
        # Saved with an EMA, model.safetensors is the average and live_model.safetensors the trained
        # weights; saved without one, an average started now starts from the trained weights.
        averaged = checkpoint.read_tensors(ckpt / checkpoint.MODEL_FILE)
        live = ckpt / checkpoint.LIVE_MODEL_FILE
        trained = checkpoint.read_tensors(live) if live.exists() else averaged
        checkpoint.load_state_dict_strict(self.model, trained, str(ckpt))
        if self.ema:
            checkpoint.load_state_dict_strict(self.ema.module, averaged, str(ckpt))
        torch.set_rng_state(tensors.pop("rng.torch"))
        self.optimizer.load_state_dict(checkpoint.optimizer_from_tensors(tensors, state["optimizer"]))
        random.setstate(_tuples(state["rng_python"]))
        np.random.set_state(tuple(np.array(x, dtype=np.uint32) if isinstance(x, list) else x
                                  for x in state["rng_numpy"]))
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.elapsed = state["global_step"], state["elapsed"]

    def log(self, record: dict) -> None:
        if distributed.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, train_set: CocoDetection, val_set: CocoDetection | None, log_every: int = 20,
              stop_at_step: int | None = None, echo: Callable[[str], None] = print) -> dict[str, float]:
        """Train until ``cfg.train.epochs`` or the time limit; return the last evaluation's stats.

        ``stop_at_step`` stops after that global step as if the run had been interrupted
        (checkpoint written, no final evaluation): resumption is tested with it."""
        tcfg = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        items = SeededItems(train_set, tcfg.seed)
        sampler = EpochSampler(len(train_set), tcfg.seed)
        model = self.model
        if distributed.is_distributed():
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(enabled=tcfg.amp and self.device.type == "cuda"
                                      and not torch.cuda.is_bf16_supported())
        stats: dict[str, float] = {}
        out_of_time = False
        start = time.monotonic() - self.elapsed
        while self.epoch < tcfg.epochs:
            items.epoch = self.epoch
            sampler.set_epoch(self.epoch, skip=self.step_in_epoch * tcfg.batch_size)
            loader = make_loader(items, tcfg.batch_size, sampler, self.cfg.data.num_workers)
            model.train()
            self.criterion.train()
            sums: dict[str, float] = {}
            bar = tqdm(loader, desc=f"epoch {self.epoch}", disable=not distributed.is_main(),
                       leave=False, dynamic_ncols=True)
            for images, mask, targets in bar:
                images, mask, targets = to_device(images, mask, targets, self.device)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(tcfg, self.epoch, self.global_step)
                with autocast(self.device, tcfg.amp):
                    outputs = model(images, mask)
                losses = compute_losses(self.criterion, outputs, targets)  # float32 whatever the autocast
                self.optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if tcfg.clip_max_norm > 0:
                    scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.clip_max_norm)
                scaler.step(self.optimizer)
                scaler.update()
                self.step_in_epoch += 1
                self.global_step += 1
                if self.ema:
                    self.ema.update(self.model, self.global_step)
                self.elapsed = distributed.from_main(time.monotonic() - start)
                for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
                    if k in losses:
                        sums[k] = sums.get(k, 0.0) + losses[k].item()
                sums["n"] = sums.get("n", 0) + 1
                bar.set_postfix(loss=f"{losses['loss'].item():.3f}")
                if self.global_step % log_every == 0:
                    n = sums.pop("n")
                    record = distributed.mean_over_processes({k: v / n for k, v in sums.items()})
                    self.log({"step": self.global_step, "epoch": self.epoch, "time": round(self.elapsed, 2),
                              "lr": self.optimizer.param_groups[0]["lr"], **record})
                    sums = {}
                out_of_time = tcfg.time_limit and self.elapsed >= tcfg.time_limit
                if out_of_time or self.global_step == stop_at_step:
                    break
            else:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            bar.close()
            # DDP keeps gradients in step, not BatchNorm statistics: each process updates its own
            # from its own batches. Rank 0's are the ones saved; evaluate with those everywhere.
            distributed.broadcast_buffers(self.model)
            if self.ema:
                distributed.broadcast_buffers(self.ema.module)
            if distributed.is_main():
                self.save()
            distributed.barrier()
            if self.global_step == stop_at_step:
                return stats
            last = self.epoch >= tcfg.epochs or out_of_time
            if val_set is not None and (last or (tcfg.eval_every and self.epoch % tcfg.eval_every == 0
                                                 and self.step_in_epoch == 0)):
                stats = evaluate(self.inference_model, self.postprocess, val_set, self.categories, self.device,
                                 tcfg.batch_size, tcfg.amp)
                self.log({"step": self.global_step, "epoch": self.epoch, "time": round(self.elapsed, 2),
                          "eval": stats})
                echo(f"epoch {self.epoch} step {self.global_step} ({self.elapsed:.0f}s): "
                     f"AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f}")
            if out_of_time:
                break
        return stats


def evaluate(model: nn.Module, postprocess: Callable, dataset: CocoDetection, categories: CategoryMap,
             device: torch.device, batch_size: int = 2, amp: bool = False) -> dict[str, float]:
    """COCO metrics of ``model`` on ``dataset`` (every process evaluates its share; results are gathered)."""
    return evaluate_each(model, postprocess, dataset, categories, device, batch_size, amp)[0]


def evaluate_each(model: nn.Module, postprocess: Callable, dataset: CocoDetection, categories: CategoryMap,
                  device: torch.device, batch_size: int = 2, amp: bool = False,
                  select: Callable[[dict], list[dict]] = lambda outputs: [outputs],
                  count: int = 1) -> list[dict[str, float]]:
    """COCO metrics of each of the ``count`` sets of predictions that ``select`` picks from the
    model's outputs (by default the main output alone; :func:`detrkit.analysis.evaluate_stages`
    picks every decoder stage's), all scored from one forward pass per batch."""
    evaluators = [CocoEvaluator(dataset.gt) for _ in range(count)]
    for outputs, targets in model_outputs(model, dataset, device, batch_size, amp):
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        image_ids = [int(t["image_id"]) for t in targets]
        for evaluator, predictions in zip(evaluators, select(outputs), strict=True):
            detections = postprocess(predictions, orig_sizes)
            evaluator.update(to_coco_results(detections, image_ids, categories.to_id))
    return [evaluator.summarize() for evaluator in evaluators]


@torch.no_grad()
def model_outputs(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 2,
                  amp: bool = False) -> Iterator[tuple[dict, list[dict]]]:
    """``model``'s outputs (in eval mode, without gradients) on this process's share of ``dataset``,
    one batch at a time, each with the batch's targets (on ``device``)."""
    model.eval()
    indices = list(range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate)
    for images, mask, targets in loader:
        images, mask, targets = to_device(images, mask, targets, device)
        with autocast(device, amp):
            outputs = model(images, mask)
        yield outputs, targets


def _jsonable(obj):
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _tuples(obj):
    return tuple(_tuples(x) for x in obj) if isinstance(obj, list) else obj
