"""MobileNet V1 (Howard et al., 2017), written in torchvision's style.

The body follows Table 1 of the paper: a full 3x3 convolution with stride 2, then 13 depthwise separable blocks
(3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU), global average pooling and a classifier.
Each conv + BN + ReLU is a ``Conv2dNormActivation``, so ``mnet_ext.fuse`` finds the depthwise ones by structure.

Choices the paper leaves open, decided here:
* Table 1's last depthwise layer says "s2" but maps 7x7 to 7x7; it is stride 1 here, as in the reference
  TensorFlow implementation.
* The width multiplier alpha scales every channel count, rounded to a multiple of 8 as torchvision's MobileNet V2/V3
  do (``_make_divisible``), which keeps channel vectors aligned for the fused kernels.
* Global average pooling is adaptive, so any input resolution (the paper's resolution multiplier rho) works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

# (output channels, stride) of the 13 depthwise separable blocks, Table 1.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled channel counts: nearest multiple of ``divisor``, never below 90% of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU followed by 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Conv2dNormActivation(in_channels, in_channels, 3, stride, groups=in_channels, activation_layer=nn.ReLU),
            Conv2dNormActivation(in_channels, out_channels, 1, activation_layer=nn.ReLU),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class MobileNetV1(nn.Module):
    # dropout 0.001: the keep probability 0.999 of the reference TensorFlow implementation
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.001) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult: expected a positive number, got {width_mult}")
        channels = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(3, channels, 3, 2, activation_layer=nn.ReLU)]
        for out, stride in _BLOCKS:
            out = _make_divisible(out * width_mult)
            layers.append(DepthwiseSeparable(channels, out, stride))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(channels, num_classes))
        for m in self.modules():  # torchvision's MobileNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v1(width_mult: float = 1.0, **kwargs: Any) -> MobileNetV1:
    """MobileNet V1 with width multiplier ``width_mult`` (alpha); kwargs go to ``MobileNetV1``."""
    return MobileNetV1(width_mult=width_mult, **kwargs)
