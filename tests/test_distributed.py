"""Data sharding between processes, and a real 2-process DDP run (gloo, CPU) under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detrkit import distributed
from detrkit.engine import EpochSampler


def shards(size: int, seed: int, epoch: int, world: int, monkeypatch) -> list[list[int]]:
    """Every process's share of an epoch, as EpochSampler computes it in that process."""
    out = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        sampler = EpochSampler(size, seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("size, world", [(8, 2), (7, 2), (5, 3), (2, 4)])
def test_every_process_gets_the_same_number_of_items(size, world, monkeypatch):
    parts = shards(size, seed=3, epoch=1, world=world, monkeypatch=monkeypatch)
    assert len({len(p) for p in parts}) == 1  # no process waits for another in a collective
    assert set().union(*parts) == set(range(size))
    assert shards(size, 3, 1, world, monkeypatch) == parts  # a function of (seed, epoch) alone
    assert shards(size, 3, 2, world, monkeypatch) != parts or size <= 2


def test_skip_resumes_inside_the_shard(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    sampler = EpochSampler(10, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=2)
    assert list(sampler) == full[2:] and len(sampler) == 3


LAUNCHER = """
    # Runs `detrkit train` in each process; records what each process saw and its final weights
    # (the moving average's, which the run evaluates and saves as its model).
    import itertools, json, os, sys, time
    from safetensors.torch import save_file
    from detrkit import cli, engine

    rank = os.environ["RANK"]
    if rank == "1":  # a clock far ahead of rank 0's: only rank 0's may decide when time is up
        ticks, monotonic = itertools.count(), time.monotonic
        time.monotonic = lambda: monotonic() + 1e6 * next(ticks)
    out = sys.argv[sys.argv.index("--out") + 1]
    boxes = []
    compute_losses, train = engine.compute_losses, engine.Run.train

    def counting(criterion, outputs, targets):
        boxes.append(sum(len(t["labels"]) for t in targets))
        return compute_losses(criterion, outputs, targets)

    def train_and_dump(self, *args, **kwargs):
        stats = train(self, *args, **kwargs)
        state = {k: v.detach().contiguous().clone() for k, v in self.inference_model.state_dict().items()}
        save_file(state, f"{out}/rank{rank}.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"boxes": boxes, "stats": stats}, f)
        return stats

    engine.compute_losses, engine.Run.train = counting, train_and_dump
    sys.exit(cli.main(sys.argv[1:]))
"""


def seed_with_fixed_shards(size: int, epochs: int, monkeypatch) -> tuple[int, list[int]]:
    """A seed whose every epoch gives process 1 the same images (whatever their order)."""
    for seed in range(1000):
        ones = [sorted(shards(size, seed, epoch, 2, monkeypatch)[1]) for epoch in range(epochs)]
        if all(o == ones[0] for o in ones):
            return seed, ones[0]
    raise AssertionError("no such seed")


def test_ddp_with_a_process_that_sees_only_empty_images(tiny_root, tiny_overrides, tmp_path, monkeypatch):
    # 4 images, batch 1, 2 epochs: 2 steps per process per epoch. Process 1's images have no boxes.
    epochs = 2
    seed, empty = seed_with_fixed_shards(4, epochs, monkeypatch)
    source = json.loads((tiny_root / "train" / "annotations.json").read_text())
    with_boxes = sorted({a["image_id"] for a in source["annotations"]})[:4]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    images = [img for img in source["images"] if img["id"] in with_boxes]
    for img in images:
        shutil.copy(tiny_root / "train" / "images" / img["file_name"], data / "images")
    annotations = [a for a in source["annotations"] if a["image_id"] in with_boxes
                   and with_boxes.index(a["image_id"]) not in empty]
    (data / "annotations.json").write_text(json.dumps({**source, "images": images, "annotations": annotations}))
    (tmp_path / "launch.py").write_text(textwrap.dedent(LAUNCHER))

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "launch.py"), "train", "--data", str(data), "--out", str(run),
               "--epochs", str(epochs), *tiny_overrides, "--set", "train.batch_size=1",
               "--set", f"train.seed={seed}", "--set", "train.ema_decay=0.9", "--time-limit", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"2-process training hung:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]

    seen = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]["boxes"]) == len(seen[1]["boxes"]) == 2 * epochs
    assert all(n > 0 for n in seen[0]["boxes"]) and seen[1]["boxes"] == [0] * (2 * epochs)
    assert seen[0]["stats"] == seen[1]["stats"] and "AP" in seen[0]["stats"]  # gathered evaluation

    weights = [load_file(str(run / f"rank{r}.safetensors")) for r in range(2)]
    checkpoint = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name  # parameters and BatchNorm statistics
        assert torch.equal(tensor, checkpoint[name]), name
    assert (run / "checkpoints" / "step_00000004" / "live_model.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
