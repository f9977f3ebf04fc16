"""Small float64 models and tasks shared by the metaopt tests."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn


def mlp(sizes=(1, 8, 8, 1), seed: int = 1) -> nn.Sequential:
    paddle.seed(seed)
    layers: list[nn.Layer] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def regression_task(seed: int = 0, n: int = 10, dim: int = 1):
    rng = np.random.default_rng(seed)
    xs, xq = (paddle.to_tensor(rng.uniform(-2, 2, (n, dim))) for _ in range(2))
    ys, yq = paddle.sin(xs).sum(axis=1, keepdim=True), paddle.sin(xq).sum(axis=1, keepdim=True)
    return xs, ys, xq, yq


def adapted_query_loss(steps: int):
    """loss_fn for check_meta_gradients: clone, adapt ``steps`` times on the support set, query loss."""

    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.mse_loss(clone(xs), ys))
        return F.mse_loss(clone(xq), yq)

    return loss_fn
