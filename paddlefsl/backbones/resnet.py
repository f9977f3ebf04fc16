"""ResNet-12 as commonly used in few-shot learning (e.g. MetaOptNet, TADAM)."""
from __future__ import annotations

from typing import Optional, Sequence

import paddle
from paddle import nn

from .common import SpatialMean


class ResNet12Block(nn.Layer):
    """Three 3x3 conv-BN layers (LeakyReLU 0.1 between), a 1x1 conv-BN shortcut, then 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(in_channels, out_channels, 3, padding=1, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(out_channels)
        self.conv2 = nn.Conv2D(out_channels, out_channels, 3, padding=1, bias_attr=False)
        self.bn2 = nn.BatchNorm2D(out_channels)
        self.conv3 = nn.Conv2D(out_channels, out_channels, 3, padding=1, bias_attr=False)
        self.bn3 = nn.BatchNorm2D(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2D(in_channels, out_channels, 1, bias_attr=False),
                                      nn.BatchNorm2D(out_channels))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2D(2, 2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, H//2, W//2]``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Layer):
    """Four residual stages (64-160-320-640 channels by default), global average pooling, linear head.

    Args:
        ways: Output classes of the head; None builds a feature extractor only (``head`` is None).
        in_channels: Input channels.
        channels: Output channels of the four stages; pass small values for tests.

    Attributes:
        features: ``nn.Sequential`` mapping ``[N, C, H, W]`` to ``[N, channels[-1]]``.
        head: ``nn.Linear(channels[-1], ways)`` or None.
    """

    def __init__(self, ways: Optional[int] = None, in_channels: int = 3,
                 channels: Sequence[int] = (64, 160, 320, 640)) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels must be four positive widths, got {channels}")
        blocks, prev = [], in_channels
        for c in channels:
            blocks.append(ResNet12Block(prev, c))
            prev = c
        self.features = nn.Sequential(*blocks, SpatialMean())
        self.feature_dim = channels[-1]
        self.head = nn.Linear(self.feature_dim, ways) if ways is not None else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Return logits ``[N, ways]`` (or features ``[N, channels[-1]]`` when there is no head)."""
        feats = self.features(x)
        return feats if self.head is None else self.head(feats)
