"""Query recollection (Chen et al., "Enhanced Training of Query-Based Object Detection via Selective
Query Recollection", CVPR 2023): a training-only change to how decoder stages are fed.

Normally decoder stage i sees only what stage i-1 produced. With recollection it also sees what
earlier stages produced, each as a separate *group* of queries that goes through the stage on its
own (self-attention never mixes groups) and whose predictions are matched and supervised on their
own. Which earlier outputs a stage receives is the one rule below (:func:`sources`):

- ``none``: the previous stage only (the baseline): 1, 1, 1, 1, 1, 1 groups;
- ``sqr`` (selective): the previous two stages: 1, 2, 3, 5, 8, 13 groups;
- ``dqr`` (dense): every earlier stage: 1, 2, 4, 8, 16, 32 groups.

Output 0 is the decoder's initial queries. Groups are laid side by side along the query axis,
(B, G*N, ...), newest first, so group 0 of every stage follows the baseline path; inference
(``none``) is the baseline model exactly.

Losses are combined as in the official implementation (QRDeformableDETRHead.loss): every
(stage, group) prediction is one more decoder output, matched with the Hungarian matcher and
given the usual loss terms with weight 1, so later stages, which see more groups, get more
supervision.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

MODES = ("none", "sqr", "dqr")

State = tuple[Tensor, ...]  # e.g. (queries,) or (queries, reference points), each (B, G*N, ...)


def sources(stage: int, mode: str) -> list[int]:
    """The outputs (0 = initial queries, j = stage j's) that feed stage ``stage`` (1-based), newest first."""
    if mode == "none":
        return [stage - 1]
    if mode == "sqr":
        return [j for j in (stage - 1, stage - 2) if j >= 0]
    if mode == "dqr":
        return list(range(stage - 1, -1, -1))
    raise ValueError(f"model.recollection: unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def group_counts(num_stages: int, mode: str) -> list[int]:
    """How many query groups pass through (and are supervised at) each of the stages 1..num_stages."""
    produced = [1]  # output 0: the initial queries, one group
    for stage in range(1, num_stages + 1):
        produced.append(sum(produced[j] for j in sources(stage, mode)))
    return produced[1:]


class Stage(NamedTuple):
    inputs: State  # what entered the stage, (B, G*N, ...) each
    outputs: State  # what it produced
    num_groups: int


def run_stages(stage: Callable[[int, State, int], State], initial: State, num_stages: int,
               mode: str) -> list[Stage]:
    """Run ``stage(i, state, num_groups)`` for i = 0..num_stages-1 (0-based layer index), feeding
    each the groups that ``mode`` recollects. Returns what every stage saw and produced."""
    produced: list[tuple[State, int]] = [(initial, 1)]
    stages = []
    for i in range(1, num_stages + 1):
        fed = [produced[j] for j in sources(i, mode)]
        state = fed[0][0] if len(fed) == 1 else tuple(torch.cat(parts, 1) for parts in zip(*(s for s, _ in fed)))
        num_groups = sum(g for _, g in fed)
        out = stage(i - 1, state, num_groups)
        stages.append(Stage(state, out, num_groups))
        produced.append((out, num_groups))
    return stages
