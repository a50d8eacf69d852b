"""ResNet backbones with torchvision's parameter names, frozen batch norm, and DETR's ``Backbone``.

The ResNets are torchvision's v1.5 layout (stride on the 3x3 conv of a bottleneck) so that
torchvision ImageNet state dicts load as they are; there is no ``fc`` head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from detrkit.config import BackboneConfig, ConfigError
from detrkit.checkpoint import load_state_dict_strict
from detrkit.errors import CheckpointError
from detrkit.ops.winograd import conv2d

STAGES = ("layer1", "layer2", "layer3", "layer4")
NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Detection batches are too small for useful batch statistics, so the ImageNet ones are kept.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # nn.BatchNorm2d state dicts carry a step counter that means nothing once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        scale, shift = scale_shift(self)
        return x * scale[:, None, None] + shift[:, None, None]


def scale_shift(norm: FrozenBatchNorm2d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The per-channel affine map of a batch norm with fixed statistics: y = x * scale + shift,
    each (C,)."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


def _folds(norm: nn.Module) -> bool:
    """Whether ``norm`` is an affine map that can fold into the convolution before it: a frozen
    batch norm, or a trainable one in eval mode (running statistics)."""
    return isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats and norm.affine)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A batch norm with fixed statistics (frozen, or in eval mode) is folded
    into the convolution (weight * scale, bias shift): one pass over the feature map instead of
    three. The weight takes the memory layout of ``x`` (channels-last on CPU, see
    ``Backbone.forward``), which measured faster than mixing layouts (bench/detr.py)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    folded = _folds(norm)
    weight, bias = _prepared(conv, norm if folded else None, channels_last)
    out = conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out if folded else norm(out)


# Optimiser steps so far, of any optimiser: fused ones (AdamW(fused=True)) update the weights in
# place without moving their version counters, which _prepared's cache otherwise relies on.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _prepared(conv: nn.Conv2d, norm: FrozenBatchNorm2d | nn.BatchNorm2d | None,
              channels_last: bool) -> tuple[Tensor, Tensor | None]:
    """The convolution's weight in the input's layout and its bias, with ``norm`` (fixed
    statistics) folded in when given. Recomputed when gradients must flow through it; otherwise
    (inference, frozen layers) kept on ``conv`` until a weight or statistic changes (an optimiser
    step, or any other in-place update: version counters move on those, ``load_state_dict``
    included) or the weights move to another device or dtype."""
    # a batch norm's training-mode updates of its running statistics move no version counter,
    # but its num_batches_tracked (a buffer) counts them
    tensors = (conv.weight,) if norm is None else (conv.weight, *norm.parameters(), *norm.buffers())
    trained = any(t.requires_grad for t in tensors)
    if torch.is_grad_enabled() and trained:
        return _prepare(conv, norm, channels_last)
    steps = _optimizer_steps[0] if trained else None  # frozen weights are not stepped
    key = (channels_last, conv.weight.data_ptr(), conv.weight.dtype, steps, *(t._version for t in tensors))
    cached = getattr(conv, "_prepared_cache", None)
    if cached is None or cached[0] != key:
        # inference-mode tensors could not be saved for a later backward: keep those uncached
        if torch.is_inference_mode_enabled():
            return _prepare(conv, norm, channels_last)
        cached = conv._prepared_cache = (key, *_prepare(conv, norm, channels_last))
    return cached[1], cached[2]


def _prepare(conv: nn.Conv2d, norm: FrozenBatchNorm2d | nn.BatchNorm2d | None,
             channels_last: bool) -> tuple[Tensor, Tensor | None]:
    weight, bias = conv.weight, None
    if norm is not None:
        scale, bias = scale_shift(norm)
        weight = weight * scale[:, None, None, None]
    return (weight.contiguous(memory_format=torch.channels_last) if channels_last else weight), bias


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``width`` is the block's output channel count."""

    expansion = 1

    def __init__(self, inplanes: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: NormLayer = FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, width, stride, dilation)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, dilation=dilation)
        self.bn2 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        return self.relu(out.add_(identity))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand to ``width * 4`` (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: NormLayer = FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = norm(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        return self.relu(out.add_(identity))


class ResNet(nn.Module):
    """A ResNet body: stem (conv1, bn1, maxpool) and four stages ``layer1..layer4``.

    ``channels[name]`` and ``strides[name]`` give each stage's output channels and its total
    stride relative to the input, read off the built blocks.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int],
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 norm: NormLayer | None = None):
        super().__init__()
        norm = norm or FrozenBatchNorm2d
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs one flag for each of layer2..layer4")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)

        inplanes, dilation = 64, 1
        stride_so_far = self.conv1.stride[0] * self.maxpool.stride
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        dilate_flags = (False, *replace_stride_with_dilation)
        for i, (name, n, dilate) in enumerate(zip(STAGES, depths, dilate_flags)):
            width, stride = 64 * 2**i, 1 if i == 0 else 2
            first_dilation = dilation
            if dilate:
                # Keep the resolution; later 3x3 convs see the same receptive field via dilation.
                dilation, stride = dilation * stride, 1
            downsample = None
            if stride != 1 or inplanes != width * block.expansion:
                downsample = nn.Sequential(_conv1x1(inplanes, width * block.expansion, stride),
                                           norm(width * block.expansion))
            blocks = [block(inplanes, width, stride, first_dilation, downsample, norm)]
            inplanes = width * block.expansion
            blocks += [block(inplanes, width, dilation=dilation, norm=norm) for _ in range(1, n)]
            self.add_module(name, nn.Sequential(*blocks))
            for b in blocks:
                stride_so_far *= b.stride
            self.channels[name] = inplanes
            self.strides[name] = stride_so_far

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W) -> {"layer1": (B, C1, H/4, W/4), ..., "layer4": (B, C4, H/32, W/32)}."""
        # ReLU and max-pooling commute; after the pooling, the ReLU and its backward touch 4x less memory
        x = self.relu(self.maxpool(conv_norm(self.conv1, self.bn1, x)))
        out = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            out[name] = x
        return out


_ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


NORMS: dict[str, NormLayer] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def resnet(name: str, replace_stride_with_dilation: Sequence[bool] = (False, False, False),
           norm: str = "frozen_bn") -> ResNet:
    """Build ``resnet18|34|50|101`` with random conv weights and ``norm`` ("frozen_bn" for
    pretrained weights, "bn" for training from scratch, where there are no statistics to freeze)."""
    if name not in _ARCHS:
        raise ConfigError(f"model.backbone.name: unknown backbone {name!r}; choose one of {', '.join(_ARCHS)}")
    if norm not in NORMS:
        raise ConfigError(f"model.backbone.norm: unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    block, depths = _ARCHS[name]
    return ResNet(block, depths, replace_stride_with_dilation, NORMS[norm])


class Backbone(nn.Module):
    """A ResNet body returning the feature maps of ``return_layers`` with matching padding masks.

    Built from ``cfg``: loads ``cfg.weights`` when set (clear it when a full model checkpoint
    follows), dilates the last stage when ``cfg.dilation`` (DC5), and freezes the parts named in
    ``cfg.frozen`` (DETR: the stem and layer1) and everything when ``cfg.train`` is False.
    """

    def __init__(self, cfg: BackboneConfig, return_layers: Sequence[str] = ("layer4",)):
        super().__init__()
        unknown = [name for name in return_layers if name not in STAGES]
        if unknown or not return_layers:
            raise ValueError(f"return_layers must be a non-empty subset of {STAGES}, got {tuple(return_layers)}")
        # The convolution weights are kept channels-last, the layout the convolutions run in (see
        # forward): a training step then no longer copies each weight into it and its gradient
        # back (detr_small's step: 0.654 s instead of 0.685, 0.559 instead of 0.584, A/B in one
        # process). Loading weights keeps the layout; so does loaded optimiser state
        # (engine.make_optimizer).
        self.body = resnet(cfg.name, (False, False, cfg.dilation), cfg.norm).to(memory_format=torch.channels_last)
        if cfg.weights:
            load_backbone_weights(self.body, cfg.weights)
        unknown = set(cfg.frozen) - {"stem", *STAGES}
        if unknown:
            raise ConfigError(f"model.backbone.frozen: unknown parts {sorted(unknown)}; use stem, {', '.join(STAGES)}")
        for name, p in self.body.named_parameters():
            part = name.split(".")[0]
            part = "stem" if part in ("conv1", "bn1") else part
            p.requires_grad_(cfg.train and part not in cfg.frozen)
        self.return_layers = tuple(return_layers)
        self.num_channels = [self.body.channels[name] for name in self.return_layers]
        self.strides = [self.body.strides[name] for name in self.return_layers]

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images: (B, 3, H, W), mask: (B, H, W) bool, True = padding.

        Returns one ``(feature (B, C_l, H_l, W_l), mask (B, H_l, W_l) bool)`` per return layer.
        """
        if images.device.type == "cpu":
            # oneDNN's convolutions run fastest on channels-last (NHWC) feature maps. The features
            # are returned in that layout: what follows are convolutions too (the projections to
            # d_model), and flattening their output to tokens (B, H*W, d) is then a view.
            # Deformable-DETR-R50 inference: 0.724 s instead of 0.764 with contiguous features.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        out = []
        for name in self.return_layers:
            x = features[name]
            m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out.append((x, m))
        return out


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout ResNet state dict (.pth or .safetensors) into ``body`` in place.

    ``fc.*`` and ``num_batches_tracked`` entries are ignored. Raises CheckpointError when the file
    cannot be read or its keys or shapes do not fit ``body``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read backbone weights (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a ResNet state dict mapping names to tensors")

    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    # a trainable BatchNorm keeps its own step counter; the file's means nothing here
    state.update({k: v for k, v in body.state_dict().items() if k.endswith("num_batches_tracked")})
    load_state_dict_strict(body, state, f"{path}: backbone weights")
