"""Multi-layer perceptron."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import paddle
from paddle import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
                "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus, "silu": nn.Silu}


class MLP(nn.Layer):
    """Fully connected network ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    An activation follows every linear layer except the last one, which is exposed as ``head``;
    all earlier layers form ``features``.

    Args:
        sizes: Layer widths, at least two entries (input and output).
        activation: A name (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"elu"``, ``"leaky_relu"``,
            ``"softplus"``, ``"silu"``) or a zero-argument callable returning an ``nn.Layer``.
    """

    def __init__(self, sizes: Sequence[int], activation: Union[str, Callable[[], nn.Layer]] = "relu") -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes needs at least two positive widths, got {sizes}")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
            make_act = _ACTIVATIONS[activation]
        else:
            make_act = activation
        layers = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(fan_in, fan_out), make_act()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])
        self.sizes = sizes

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Apply the network to ``[N, sizes[0]]`` inputs."""
        return self.head(self.features(x))
