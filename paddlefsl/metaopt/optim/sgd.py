"""Differentiable twin of ``paddle.optimizer.SGD``: ``p <- p - lr * (g + regularizer'(p))``."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, regularize

__all__ = ["SGDTwin"]


class SGDTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.SGD`` (Paddle's ``sgd`` kernel: ``param - lr * grad``)."""

    paddle_type = paddle.optimizer.SGD
    group_keys = ()
    hyper_names = ("learning_rate", "weight_decay")

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return {}

    def update_one(self, grad, state, param, hyper):
        grad = regularize(grad, param, hyper)
        return param - self.lr(param, hyper) * grad, state
