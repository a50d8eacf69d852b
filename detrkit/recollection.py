"""Query recollection (Chen et al., "Enhanced Training of Query-Based Object Detection via Selective
Query Recollection", CVPR 2023): a training-only change to how decoder stages are fed.

Normally decoder stage i sees only what stage i-1 produced. With recollection it also sees what
earlier stages produced, each as a separate *group* of queries that goes through the stage on its
own (self-attention never mixes groups) and whose predictions are matched and supervised on their
own. Which earlier outputs a stage receives is the one rule below (:func:`sources`):

- ``none``: the previous stage only (the baseline): 1, 1, 1, 1, 1, 1 groups;
- ``sqr`` (selective): the previous two stages: 1, 2, 3, 5, 8, 13 groups;
- ``dqr`` (dense): every earlier stage: 1, 2, 4, 8, 16, 32 groups;
- ``recurrent``: DQR, plus one more pass of the last stage over its own outputs (32 more groups).
  The last stage thereby learns to refine queries from any depth, its own included, so at
  inference it alone can be looped: :func:`recurrent_model` keeps that one stage, run T times
  (``detrkit recurrent``; ``detrkit.load(path, recurrent_steps=T)``).

Output 0 is the decoder's initial queries. Groups are laid side by side along the query axis,
(B, G*N, ...), newest first, so group 0 of every stage follows the baseline path; inference
(``none``) is the baseline model exactly.

Losses are combined as in the official implementation (QRDeformableDETRHead.loss): every
(stage, group) prediction is one more decoder output, matched with the Hungarian matcher and
given the usual loss terms with weight 1, so later stages, which see more groups, get more
supervision.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from detrkit.checkpoint import load_state_dict_strict
from detrkit.config import Config, ConfigError

MODES = ("none", "sqr", "dqr", "recurrent")

State = tuple[Tensor, ...]  # e.g. (queries,) or (queries, reference points), each (B, G*N, ...)


def sources(stage: int, mode: str, num_layers: int) -> list[int]:
    """The outputs (0 = initial queries, j = stage j's) that feed stage ``stage`` (1-based) of a
    decoder of ``num_layers`` layers, newest first."""
    if mode == "none":
        return [stage - 1]
    if mode == "sqr":
        return [j for j in (stage - 1, stage - 2) if j >= 0]
    if mode == "dqr" or (mode == "recurrent" and stage <= num_layers):
        return list(range(stage - 1, -1, -1))
    if mode == "recurrent":  # the extra pass: the last layer again, on its own outputs
        return [stage - 1]
    raise ValueError(f"model.recollection: unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def num_stages(num_layers: int, mode: str, recurrent_steps: int = 0) -> int:
    """Stages a decoder runs: its layers, one more in recurrent training, or ``recurrent_steps``
    passes of a single-stage recurrent model."""
    if recurrent_steps:
        return recurrent_steps
    return num_layers + (1 if mode == "recurrent" else 0)


def layer_index(stage: int, num_layers: int) -> int:
    """The layer (and per-layer head) that runs 0-based stage ``stage``: stages past the last
    layer reuse it (recurrent training and inference)."""
    return min(stage, num_layers - 1)


def group_counts(num_layers: int, mode: str, recurrent_steps: int = 0) -> list[int]:
    """How many query groups pass through (and are supervised at) each stage."""
    produced = [1]  # output 0: the initial queries, one group
    for stage in range(1, num_stages(num_layers, mode, recurrent_steps) + 1):
        produced.append(sum(produced[j] for j in sources(stage, mode, num_layers)))
    return produced[1:]


class Stage(NamedTuple):
    inputs: list[State]  # what entered the stage: the recollected parts, newest first, (B, G_j*N, ...) each
    outputs: State  # what it produced, (B, G*N, ...) each
    num_groups: int


def run_stages(stage: Callable[[int, State, int], State], initial: State, num_layers: int, mode: str,
               recurrent_steps: int = 0) -> list[Stage]:
    """Run ``stage(layer, state, num_groups)`` for every stage (see :func:`num_stages`), feeding
    each the groups that ``mode`` recollects. Returns what every stage saw and produced.

    The fed groups are concatenated along the query axis and go through the stage in one call.
    Groups whose states differ in shape (one-stage refinement: the initial queries carry 2-d
    reference points, refined ones boxes) go through it in separate calls, which gives the same
    result because groups never interact."""
    produced: list[tuple[State, int]] = [(initial, 1)]
    stages = []
    for i in range(1, num_stages(num_layers, mode, recurrent_steps) + 1):
        fed = [produced[j] for j in sources(i, mode, num_layers)]
        layer = layer_index(i - 1, num_layers)
        outs = [stage(layer, _cat([s for s, _ in run]), sum(g for _, g in run)) for run in _same_shape_runs(fed)]
        out = _cat(outs)
        num_groups = sum(g for _, g in fed)
        stages.append(Stage([s for s, _ in fed], out, num_groups))
        produced.append((out, num_groups))
    return stages


def _cat(states: list[State]) -> State:
    return states[0] if len(states) == 1 else tuple(torch.cat(parts, 1) for parts in zip(*states))


def _same_shape_runs(fed: list[tuple[State, int]]) -> list[list[tuple[State, int]]]:
    """Consecutive fed parts whose tensors have the same trailing shapes, so they can be concatenated."""
    runs: list[list[tuple[State, int]]] = []
    for part in fed:
        if runs and all(a.shape[2:] == b.shape[2:] for a, b in zip(runs[-1][-1][0], part[0])):
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


PER_LAYER = ("transformer.decoder.layers.", "class_embed.", "bbox_embed.",
             "transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def _per_layer(key: str) -> tuple[str, str, str] | None:
    """A parameter name of a decoder layer or a per-layer head -> (prefix, layer index, rest of
    the name); None for the rest of the model (DETR's shared heads, the encoder, the backbone)."""
    prefix = next((p for p in PER_LAYER if key.startswith(p)), None)
    index, _, rest = key[len(prefix):].partition(".") if prefix else ("", "", "")
    return (prefix, index, rest) if index.isdigit() else None


def to_recurrent(state_dict: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The weights of the single-stage recurrent model: decoder layer ``num_layers - 1`` (and its
    heads) become layer 0; the other decoder layers are dropped. Per-layer heads (refinement) are
    renumbered the same way; a two-stage model's encoder head (index ``num_layers``) becomes 1."""
    renumber = {str(num_layers - 1): "0", str(num_layers): "1"}
    out = {}
    for key, value in state_dict.items():
        split = _per_layer(key)
        if split is None:
            out[key] = value
        elif split[1] in renumber:
            prefix, index, rest = split
            out[f"{prefix}{renumber[index]}.{rest}"] = value
    return out


def recurrent_config(cfg: Config, steps: int) -> Config:
    """The config of the single-stage recurrent model made from a model trained with ``cfg``."""
    out = copy.deepcopy(cfg)
    out.model.transformer.num_decoder_layers = 1
    out.model.recurrent_steps = steps
    out.model.recollection = "none"
    out.model.backbone.weights = None  # the trained model holds the backbone's weights
    return out


def recurrent_model(model: nn.Module, cfg: Config, steps: int, source: str) -> tuple[nn.Module, Config]:
    """The single-stage recurrent model, its decoder layer run ``steps`` times, and its config.

    ``model`` (built from ``cfg``) is either trained with ``model.recollection=recurrent``, whose
    last decoder layer and that layer's heads are kept, or such a single-stage model already, whose
    number of steps alone changes. Any other raises ConfigError naming ``source``, its checkpoint."""
    from detrkit.build import build_model  # build and the decoders import this module

    if cfg.model.recollection != "recurrent" and not cfg.model.recurrent_steps:
        raise ConfigError(f"{source}: model.recollection is {cfg.model.recollection!r}; only a model trained with "
                          "model.recollection=recurrent can run its last decoder stage alone")
    if steps < 1:
        raise ConfigError(f"{source}: model.recurrent_steps must be at least 1, got {steps}")
    # a single-stage model has one layer: to_recurrent keeps it and recurrent_config only sets the steps
    state = to_recurrent(model.state_dict(), cfg.model.transformer.num_decoder_layers)
    cfg = recurrent_config(cfg, steps)
    single = build_model(cfg)
    load_state_dict_strict(single, state, source)
    return single.to(next(model.parameters()).device).eval(), cfg


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all of ``model``'s parameters, the decoder's: its layers, its norm and the per-layer heads)."""
    params = dict(model.named_parameters())  # a module shared by two parents is listed once
    decoder = [p for k, p in params.items() if k.startswith("transformer.decoder.") or _per_layer(k)]
    return sum(p.numel() for p in params.values()), sum(p.numel() for p in decoder)
