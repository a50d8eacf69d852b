"""An exponential moving average (EMA) of the weights, for evaluation and the saved model.

Early in training, at a constant learning rate, the weights still take large steps, and the AP
of checkpoints a hundred steps apart swings widely (the demo's moved by 0.09). The average of the
recent steps' weights is a steadier model, and it costs training nothing: the optimiser keeps
stepping the live weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from detrkit.config import ConfigError


class EMA:
    """``module`` holds the average of the weights of the model given to :meth:`update`.

    Batch-norm running statistics are averaged too; integer buffers (batch counts) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay: expected a number in (0, 1) (or 0: no average), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay after optimiser step ``step`` (1-based). It starts small and grows to
        ``decay``, so the average forgets the random initial weights fast and, in a short run,
        covers about the last tenth of the steps taken."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model``'s weights, after its optimiser step ``step``."""
        averaged, live = [], []
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                live.append(theirs)
            else:
                mine.copy_(theirs)
        # one pass over all tensors; the in-place update moves their version counters, which
        # is what tells backbone._prepared to refold the averaged batch norms
        torch._foreach_lerp_(averaged, live, 1.0 - self.decay_at(step))
