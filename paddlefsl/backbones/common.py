"""Small shared layers."""
from __future__ import annotations

import paddle
from paddle import nn


class Flatten(nn.Layer):
    """Flatten all but the batch dimension (implemented with ``reshape``)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.reshape(x, [x.shape[0], -1])


class SpatialMean(nn.Layer):
    """Average over the spatial dimensions of an NCHW tensor, giving ``[N, C]``."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.mean(x, axis=[2, 3])
