"""The 4-block convolutional backbone of the MAML paper (Finn et al., 2017)."""
from __future__ import annotations

import paddle
from paddle import nn

from .common import Flatten, SpatialMean

_VARIANTS = ("omniglot", "miniimagenet")


def _conv_out(size: int, variant: str) -> int:
    if variant == "omniglot":  # 3x3 conv, stride 2, padding 1
        return (size - 1) // 2 + 1
    return size // 2  # 3x3 conv, padding 1 keeps the size; 2x2 max-pool halves it (floor)


class Conv4(nn.Layer):
    """Four conv blocks followed by a linear head.

    Variants (as in the MAML paper):

    * ``"omniglot"``: each block is 3x3 conv (stride 2, padding 1) -> BatchNorm -> ReLU, no pooling;
      the final feature map is averaged over space, so the feature size is ``hidden``.
    * ``"miniimagenet"``: each block is 3x3 conv (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool;
      the final map is flattened (``hidden * 5 * 5`` for 84x84 inputs).

    Args:
        ways: Number of output classes of the head.
        in_channels: Input channels (1 for Omniglot, 3 for miniImageNet).
        hidden: Channels of every conv layer (64 Omniglot, 32 miniImageNet in the paper).
        variant: ``"omniglot"`` or ``"miniimagenet"``.
        image_size: Input height/width, used to size the head.
        transductive_bn: If True, BatchNorm always normalizes with the current batch statistics
            (also in eval mode), as the original MAML code does.

    Attributes:
        features: ``nn.Sequential`` mapping ``[N, C, H, W]`` to ``[N, feature_dim]``.
        head: ``nn.Linear(feature_dim, ways)``.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, variant: str = "omniglot",
                 image_size: int = 28, transductive_bn: bool = False) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant = variant
        layers = []
        channels, size = in_channels, image_size
        bn_kwargs = {"use_global_stats": False} if transductive_bn else {}
        for _ in range(4):
            if variant == "omniglot":
                layers += [nn.Conv2D(channels, hidden, 3, stride=2, padding=1),
                           nn.BatchNorm2D(hidden, **bn_kwargs), nn.ReLU()]
            else:
                layers += [nn.Conv2D(channels, hidden, 3, padding=1),
                           nn.BatchNorm2D(hidden, **bn_kwargs), nn.ReLU(), nn.MaxPool2D(2, 2)]
            channels, size = hidden, _conv_out(size, variant)
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for four {variant} blocks")
        if variant == "omniglot":
            layers.append(SpatialMean())
            self.feature_dim = hidden
        else:
            layers.append(Flatten())
            self.feature_dim = hidden * size * size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, ways)

    @classmethod
    def omniglot(cls, ways: int, image_size: int = 28, **kwargs) -> "Conv4":
        """MAML's Omniglot network: 1 input channel, 64 channels, strided convs."""
        return cls(ways, in_channels=1, hidden=64, variant="omniglot", image_size=image_size, **kwargs)

    @classmethod
    def miniimagenet(cls, ways: int, image_size: int = 84, **kwargs) -> "Conv4":
        """MAML's miniImageNet network: 3 input channels, 32 channels, max-pooling."""
        return cls(ways, in_channels=3, hidden=32, variant="miniimagenet", image_size=image_size, **kwargs)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Return logits ``[N, ways]``."""
        return self.head(self.features(x))
